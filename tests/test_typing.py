"""The public API is typed for static checkers: mypy (strict about the calls below) accepts
correct uses of the installed package and rejects wrong argument types, e.g. axis="1"."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy")

GOOD = textwrap.dedent("""
    import numpy as np
    import pybn
    from pybn.distributed import SyncBatchNorm

    x = np.ones((4, 3, 5), np.float32)
    y = pybn.batchnorm(x, axis=1, eps=1e-3, activation="relu", virtual_batch=2)
    y2, mean, invstd = pybn.batchnorm_forward(x)[:3]
    dx, dgamma, dbeta = pybn.batchnorm_backward(x, x, mean, invstd)
    count, m, m2 = pybn.batch_stats(x)
    w2, b2 = pybn.fold(np.ones((3, 2)), None, None, None, np.zeros(3), np.ones(3))
    bn = pybn.BatchNorm(3, momentum=None)
    out = bn(x)
    grad = bn.backward(out)
    state = bn.state_dict()
    bn.load_state_dict(state)
    threads: int = pybn.get_num_threads()
    isa: str = pybn.cpu_isa()
    cuda: bool = pybn.has_cuda()
    include: str = pybn.get_include()
    layer: pybn.BatchNorm = bn.eval()
""")

BAD = {
    'pybn.batchnorm(x, axis="1")': r'Argument "axis" to "batchnorm" has incompatible type "str"; expected "int"',
    "pybn.batchnorm(x, eps=None)": r'Argument "eps" to "batchnorm" has incompatible type "None"',
    "pybn.batchnorm(x, trainin=True)": r'Unexpected keyword argument "trainin" for "batchnorm"',
    'pybn.BatchNorm("3")': r'Argument 1 to "BatchNorm" has incompatible type "str"; expected "int"',
    "pybn.set_num_threads(2.5)": r'Argument 1 to "set_num_threads" has incompatible type "float"; expected "int"',
    "n: str = pybn.get_num_threads()": r'Incompatible types in assignment \(expression has type "int"',
}


def mypy(tmp_path, source):
    f = tmp_path / "use_pybn.py"
    f.write_text(source)
    # from tmp_path, so that the installed package (with py.typed) is what mypy reads
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
                          "--no-error-summary", "--hide-error-context", "--follow-imports=silent", str(f)],
                         capture_output=True, text=True, cwd=tmp_path)
    return run.returncode, run.stdout + run.stderr


def test_correct_calls_type_check(tmp_path):
    rc, out = mypy(tmp_path, GOOD)
    assert rc == 0, out


@pytest.mark.parametrize("line", list(BAD))
def test_wrong_argument_types_are_reported(tmp_path, line):
    import re
    rc, out = mypy(tmp_path, "import numpy as np\nimport pybn\nx = np.ones((4, 3), np.float32)\n" + line + "\n")
    assert rc == 1 and re.search(BAD[line], out), out
