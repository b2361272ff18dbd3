"""Each process imports only what it needs.

Under the deployment engine every Flower message runs in a fresh ClientApp process, so
import time is paid per message: the relay ClientApp imports no torch at all (it only
forwards to the site worker). In the site worker and in simulation, MONAI (U-Net, Dice
loss) and Opacus (DP-SGD) load only when used.
"""

from __future__ import annotations

import subprocess
import sys

RELAY = """
import sys
import client.app
print(sorted(m for m in ("torch", "opacus", "monai", "client.site.handlers") if m in sys.modules))
"""

CHECK = """
import sys
import client.site.handlers
from common.models import get_model
from common.tasks import get_task
get_model("cnn")
get_task("classification").make_loss()
print(sorted(m for m in ("monai", "opacus") if m in sys.modules))
"""


def test_the_relay_clientapp_imports_no_training_stack():
    out = subprocess.run(
        [sys.executable, "-c", RELAY], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_cnn_classification_site_does_not_import_monai_or_opacus():
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
