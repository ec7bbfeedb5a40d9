"""Security: no unpickling, localhost, upload caps."""

from __future__ import annotations

import ast
import io
import os
import pickle
import struct
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from core.data.base import DataError
from core.data.cifar import RestrictedUnpickler, allowed_globals
from core.data.imageio import (
    MAX_UPLOAD_BYTES,
)
from tests.bad_input.cases import (
    ROOT,
    cases,
)

GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
           ("builtins", "open"), ("builtins", "getattr"), ("builtins", "__import__"),
           ("subprocess", "Popen"), ("shutil", "rmtree"), ("torch", "load"), ("numpy", "load"),
           ("pickle", "loads"), ("copyreg", "_reconstructor"), ("functools", "partial"),
           ("operator", "attrgetter"), ("numpy", "frombuffer"), ("numpy.lib.npyio", "load"),
           ("collections", "OrderedDict"), ("builtins", "object"), ("torch", "Tensor")]
IDENTIFIERS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


def global_pickle(module: str, name: str, protocol: int, args: list[str]) -> bytes:
    """A pickle that calls module.name(*args), named by GLOBAL or (protocol 4+) STACK_GLOBAL."""
    head = b"\x80" + bytes([protocol]) if protocol >= 2 else b""
    if protocol >= 4:
        found = b"".join(b"\x8c" + bytes([len(s.encode())]) + s.encode() for s in (module, name))
        found += b"\x93"
    else:
        found = b"c" + f"{module}\n{name}\n".encode()
    text = [arg.encode() for arg in args]
    packed = b"(" + b"".join(b"X" + struct.pack("<I", len(t)) + t for t in text) + b"t"
    return head + found + packed + b"R."


@cases("pickle naming a global")
@given(target=st.sampled_from(GLOBALS) | st.tuples(
    st.lists(IDENTIFIERS, min_size=1, max_size=3).map(".".join), IDENTIFIERS),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_restricted_unpickler_refuses_every_other_global(target: tuple[str, str], protocol: int
                                                         ) -> None:
    assume(target not in allowed_globals())
    module, name = target
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "marker"  # what open(marker, "w") and the like would create
        path = Path(tmp) / "data_batch_1"
        path.write_bytes(global_pickle(module, name, protocol, [str(marker), "w"]))
        with open(path, "rb") as f, pytest.raises(DataError) as info:
            RestrictedUnpickler(f, str(path)).load()
        assert sorted(os.listdir(tmp)) == ["data_batch_1"]
    assert str(info.value) == (f"refusing to load '{path}': it references {module}.{name}, "
                               "which is not a numpy array (expected a CIFAR python batch)")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_still_reads_arrays_lists_and_dicts(protocol: int) -> None:
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2],
             b"name": "x", "scale": np.float64(0.5)}
    back = RestrictedUnpickler(io.BytesIO(pickle.dumps(batch, protocol)), "batch").load()
    assert back.keys() == batch.keys() and back["labels"] == [1, 2]
    np.testing.assert_array_equal(back["data"], batch["data"])
    assert back["scale"] == 0.5
    objects = np.array([print], dtype=object)  # an object array names what it holds
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.print"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(objects, protocol)), "batch").load()


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
              "marshal"}


def unsafe_loads(source: str, path: str = "<source>") -> list[str]:
    """Every place in `source` that can unpickle: a module of UNPICKLERS, torch.load without
    weights_only=True, allow_pickle=True, read_pickle, an Unpickler other than cifar's."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS - {"pickle"}:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"{where}: from {node.module} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "pickle" and node.attr in ("load", "loads", "Unpickler")):
            found.append(f"{where}: pickle.{node.attr}")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            keywords = {k.arg: k.value for k in node.keywords}
            flag = keywords.get("weights_only")
            is_torch = isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch"
            if is_torch and name == "load" and not (
                    isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
            pickles = keywords.get("allow_pickle")
            if isinstance(pickles, ast.Constant) and pickles.value is True:
                found.append(f"{where}: allow_pickle=True")
            if name == "read_pickle":
                found.append(f"{where}: read_pickle")
    return found


def test_the_unpickling_check_finds_what_it_looks_for() -> None:
    assert unsafe_loads("import torch\ntorch.load('m.pt')\n")
    assert unsafe_loads("import torch\ntorch.load('m.pt', weights_only=False)\n")
    assert not unsafe_loads("import torch\ntorch.load('m.pt', weights_only=True)\n")
    assert unsafe_loads("import pickle\npickle.loads(b'')\n")
    assert unsafe_loads("from pickle import load\n")
    assert unsafe_loads("import numpy as np\nnp.load('a.npy', allow_pickle=True)\n")
    assert unsafe_loads("import joblib\n") and unsafe_loads("pd.read_pickle('x')\n")
    assert unsafe_loads("class U(pickle.Unpickler):\n    pass\n")


def test_no_source_can_unpickle_a_user_file() -> None:
    """core/ and app/ never unpickle: the one Unpickler is cifar's, which allows numpy only."""
    found = []
    for path in sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "app").rglob("*.py")]):
        found += unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    cifar = "core/data/cifar.py"
    allowed = [f for f in found if f.startswith(cifar) and f.endswith(": pickle.Unpickler")]
    assert len(allowed) == 1  # `class RestrictedUnpickler(pickle.Unpickler)`, with find_class
    assert [f for f in found if f not in allowed] == []
    source = (ROOT / cifar).read_text(encoding="utf-8")
    assert "def find_class(self, module: str, name: str)" in source


def test_streamlit_config_listens_on_localhost_and_caps_uploads() -> None:
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["address"] in ("localhost", "127.0.0.1")
    assert 0 < server["maxUploadSize"] * 2**20 <= MAX_UPLOAD_BYTES  # Streamlit's MB: 2**20 bytes
    assert server.get("enableXsrfProtection", True) and server.get("enableCORS", True)
