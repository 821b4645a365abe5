"""rcam imports CompressAI's entropy models and layers without the package init's point-cloud stack, and the
package is still whole for whoever asks for more of it."""

import subprocess
import sys

import pytest

pytest.importorskip("compressai")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_rcam_does_not_import_the_point_cloud_stack():
    loaded = _run(
        "import sys, rcam.cli, rcam.comparators.rawtobit\n"
        "from rcam.codec.zoo import load_codec\n"
        "load_codec('rcam-small', 'cpu')  # builds the entropy models, which ask compressai for its coder\n"
        "print(sorted(m for m in ('torch_geometric', 'torch._dynamo', 'pandas', 'compressai.datasets') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_compressai_is_whole_when_asked_for_more():
    printed = _run(
        "import rcam.codec.models, compressai\n"
        "from compressai.entropy_models import EntropyBottleneck\n"
        "assert compressai.get_entropy_coder() == 'ans' and EntropyBottleneck(4).entropy_coder is not None\n"
        "print(compressai.__version__, compressai.zoo.bmshj2018_hyperprior.__name__)"
    )
    version, name = printed.split()
    assert version.count(".") >= 1 and name == "bmshj2018_hyperprior"
