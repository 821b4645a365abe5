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


def test_scipy_stats_loads_only_when_used():
    """compressai.entropy_models imports scipy.stats for GaussianConditional.update, which rcam never calls:
    a stand-in takes its place until something uses it, and then it is the real module, for compressai and
    for any other importer."""
    printed = _run(
        "import sys, rcam.cli\n"
        "from rcam.codec.zoo import load_codec\n"
        "load_codec('rcam-small', 'cpu')\n"
        "print(type(sys.modules['scipy.stats']).__name__, 'scipy.stats._distn_infrastructure' in sys.modules)\n"
        "from compressai.entropy_models import GaussianConditional\n"
        "conditional = GaussianConditional([0.11, 0.5, 2.0])\n"
        "conditional.update()  # the one call that needs scipy.stats.norm\n"
        "import scipy.stats\n"
        "from scipy.stats import norm\n"
        "print(type(sys.modules['scipy.stats']).__name__, scipy.stats is sys.modules['scipy.stats'], round(norm.ppf(0.975), 3))"
    )
    before, after = printed.splitlines()
    assert before == "_Deferred False"
    assert after == "module True 1.96"
