from lego_viz.cli.commands import run

run()
