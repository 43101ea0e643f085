from lego_viz.cli import run

run()
