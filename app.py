"""Build the LoRA-LEGO explorer from lego_viz.ui and launch it (a Hugging Face Space runs this file)."""

import argparse
import os

from lego_viz.ui import build_demo, launch_options
from lego_viz.ui.runtime import configure_threads, public_mode, server_port


def main() -> None:
    parser = argparse.ArgumentParser(description="Launch the LoRA-LEGO explorer.")
    parser.add_argument("--public", action="store_true", help="public deployment: refuse local paths (implied by SPACE_ID)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to bind")
    parser.add_argument("--port", type=int, default=None, help="port (default: PORT, GRADIO_SERVER_PORT or 7860)")
    args = parser.parse_args()
    configure_threads()
    demo = build_demo(public=public_mode(args.public))
    demo.launch(server_name=args.host, server_port=args.port or server_port(), **launch_options())


if __name__ == "__main__":
    main()
