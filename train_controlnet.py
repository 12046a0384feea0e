"""`python train_controlnet.py --config F [--set k=v]...` == `controlnet-emo train ...`.

Works under `accelerate launch train_controlnet.py --config ...`.
"""

import sys

from controlnet_emo.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
