"""Nothing a file says can run code: checkpoints are data, a data path taken from a checkpoint
grants no trust, and the one format that unpickles (MAF's GAS) needs the caller's opt-in."""

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, config

from cnf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnf.data import get_dataset
from cnf.runs import load_run
from cnf.training import ConfigError, TrainConfig, train

CNF_SOURCES = sorted((Path(__file__).parents[1] / "cnf").rglob("*.py"))


class Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


def _gas_dir(root: Path, canary: Path) -> Path:
    gas = root / "gas"
    gas.mkdir()
    (gas / "ethylene_CO.pickle").write_bytes(pickle.dumps(Payload(canary)))
    return gas


def test_gas_is_never_unpickled_without_the_callers_trust(tmp_path: Path) -> None:
    canary = tmp_path / "PWNED"
    gas = _gas_dir(tmp_path, canary)
    with pytest.raises(PermissionError, match=r"unpickles .*ethylene_CO.pickle.*--trust-pickle"):
        get_dataset(str(gas))
    assert not canary.exists()


def test_a_checkpoint_naming_gas_grants_no_trust(tmp_path: Path) -> None:
    canary = tmp_path / "PWNED"
    gas = _gas_dir(tmp_path, canary)
    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    ckpt["config"]["data"] = ckpt["data"]["name"] = ckpt["dataset"]["name"] = str(gas)
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(crafted, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    run = load_run(crafted)  # the model loads: it is only weights
    with pytest.raises(PermissionError, match="--trust-pickle"):
        run.dataset()
    ckpt["dataset"]["options"] = {"trust_pickle": True}  # nor can the checkpoint grant it
    save_checkpoint(crafted, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match=r"does not fit.*cannot hold trust_pickle"):
        load_run(crafted)
    ckpt["config"]["extra"] = {"trust_pickle": True}  # ... nor its config
    with pytest.raises(ConfigError, match="extra cannot hold trust_pickle"):
        TrainConfig.from_dict(ckpt["config"])
    assert not canary.exists()


def test_gas_with_trust_follows_the_maf_preprocessing(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")  # in the dev extras, so CI runs this
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(400, 6)), columns=[f"s{i}" for i in range(6)])
    frame["s5"] = frame["s4"] * 2 + 1e-4 * rng.normal(size=400)  # correlated > 0.98: dropped
    for name in ("Meth", "Eth", "Time"):
        frame[name] = rng.random(400)
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    data = get_dataset(str(tmp_path / "gas"), trust_pickle=True)
    assert data.event_shape == (5,)
    assert [len(data.splits.train), len(data.splits.validation), len(data.test())] == [324, 36, 40]


def test_checkpoints_that_carry_code_are_refused_without_running_it(tmp_path: Path) -> None:
    canary = tmp_path / "PWNED"
    for i, write in enumerate((lambda p: torch.save(Payload(canary), p),
                               lambda p: p.write_bytes(pickle.dumps(Payload(canary))),
                               lambda p: torch.save({"format": "cnf-checkpoint", "version": 1,
                                                     "config": Payload(canary)}, p))):  # fmt: skip
        path = tmp_path / f"evil{i}.pt"
        write(path)
        with pytest.raises(CheckpointError, match="not a cnf checkpoint") as refused:
            load_checkpoint(path)
        if i != 1:  # torch's refusal of the code, said plainly and whole (not clipped)
            assert "it holds code" in str(refused.value) and "arbitrary code" in str(refused.value)
            assert "\x1b" not in str(refused.value)  # no terminal escapes
    assert not canary.exists()


def test_numpy_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    canary = tmp_path / "PWNED"
    np.save(tmp_path / "evil.npy", np.array([[Payload(canary)]], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", x=np.array([[Payload(canary)]], dtype=object))
    for name in ("evil.npy", "evil.npz"):
        with pytest.raises(ValueError, match="without unpickling"):
            get_dataset(str(tmp_path / name))
    assert not canary.exists()


# Every place in cnf/ that could deserialize code, and why each is safe. A new one fails this
# test until it is added here with its reason (and a payload test above).
ALLOWED = {
    ("checkpoint.py", "torch.load"): "weights_only=True: tensors and plain containers only",
    ("data/image_files.py", "pickle.Unpickler"): "_NumpyOnly refuses every global but numpy's",
    ("data/maf.py", "pd.read_pickle"): "GAS, only behind the caller's trust_pickle",
}
DANGEROUS = {"torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "pd.read_pickle",
             "eval", "exec", "np.load", "yaml.load", "marshal.loads", "shelve.open",
             "dill.load", "joblib.load"}  # fmt: skip


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        target = node.func if isinstance(node, ast.Call) else None
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                yield ast.unparse(base), node
        if target is not None:
            yield ast.unparse(target), node


def test_every_deserialization_in_the_package_is_accounted_for() -> None:
    root = Path(__file__).parents[1] / "cnf"
    found = set()
    for path in CNF_SOURCES:
        for name, node in _calls(path):
            if name not in DANGEROUS:
                continue
            where = path.relative_to(root).as_posix()
            if name == "np.load":  # numpy is safe exactly when allow_pickle is False
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kwargs.get("allow_pickle") == "False", f"{where}: np.load with pickles"
                continue
            if name == "torch.load":
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kwargs.get("weights_only") == "True", f"{where}: torch.load of code"
            assert (where, name) in ALLOWED, f"{where}: {name} is not accounted for"
            found.add((where, name))
    assert found == set(ALLOWED)  # and every entry is still real
