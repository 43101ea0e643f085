"""Print the README's reliability table: every bad-input case with the message users actually get.

    .venv/bin/python scripts/reliability_table.py
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bad_inputs import BOMB_CAP, CASES, CONFIG_CAP, load_case_error  # noqa: E402

import lego_viz.adapters.loading as adapters_mod  # noqa: E402
import lego_viz.export.yaml_io as yaml_io  # noqa: E402


def main() -> None:
    adapters_mod.MAX_UNZIPPED_BYTES = BOMB_CAP  # the corpus' zip bomb is sized against the lowered cap
    yaml_io.MAX_CONFIG_BYTES = CONFIG_CAP  # and its oversized config
    print("| # | bad input | where | message (library, CLI and app) |")
    print("|---|---|---|---|")
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            message = load_case_error(case, Path(tmp)).replace(tmp, "…").replace("|", "\\|")
        if len(message) > 150:
            message = message[:147] + "…"
        print(f"| {i} | {case.description} | {case.kind} | {message} |")


if __name__ == "__main__":
    main()
