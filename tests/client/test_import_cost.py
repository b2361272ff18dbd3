"""A ClientApp process imports only what its message needs.

Under the deployment engine every Flower message runs in a fresh ClientApp process, so
import time is paid per message: MONAI (U-Net, Dice loss) and Opacus (DP-SGD) load
only when used.
"""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import client.app
from common.models import get_model
from common.tasks import get_task
get_model("cnn")
get_task("classification").make_loss()
print(sorted(m for m in ("monai", "opacus") if m in sys.modules))
"""


def test_a_cnn_classification_clientapp_does_not_import_monai_or_opacus():
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_unet_and_dp_training_still_find_them():
    code = CHECK + 'get_model("unet"); get_task("segmentation").make_loss()\n'
    code += "from client.privacy import epsilon_of\n"
    code += "epsilon_of([(1.0, 0.01, 10)], delta=1e-5)\n"
    code += 'print(sorted(m for m in ("monai", "opacus") if m in sys.modules))\n'
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "['monai', 'opacus']"
