"""``python infer.py ...`` is ``controlnet-emo infer ...`` (see controlnet_emo/inference.py)."""

import sys

from controlnet_emo.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
