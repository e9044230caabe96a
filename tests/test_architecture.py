"""The package's shape: layers point one way (core <- training <- CLI, plotting beside training),
no import cycles (lazy imports included), every public name imports, functions stay short, and
checkpoints of the previous format still load."""

import ast
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import cnf
from cnf.checkpoint import VERSION, load_checkpoint
from cnf.runs import load_run

ROOT = Path(cnf.__file__).parent
DATA = Path(__file__).parent / "data"
# the layers above the core: training, plotting, and the user-facing front ends
TRAINING = ("cnf.training",)
PLOTTING = ("cnf.viz",)
FRONT = ("cnf.cli", "cnf.__main__", "cnf.density", "cnf.regressor")


def _module_name(path: Path) -> str:
    parts = ["cnf", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.AST, module: str) -> set[str]:
    """The cnf modules an import statement names (``from cnf import X`` resolves X to the module
    that defines it, through the package's lazy table)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("cnf")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:  # relative imports (none today, but resolve them all the same)
        package = module.rsplit(".", node.level)[0]
        base = f"{package}.{base}".rstrip(".")
    if not base.startswith("cnf"):
        return set()
    out = set()
    for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:
            out.add(full)
        elif base == "cnf" and alias.name in cnf._EXPORTS:
            out.add(cnf._EXPORTS[alias.name])
        else:
            out.add(base)
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the cnf modules it imports anywhere in its body (functions included)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            deps |= _targets(node, name)
        graph[name] = deps - {name}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles_anywhere() -> None:
    graph = _graph()
    cycles = sorted(m for m in graph if m in _reach(graph, m) and m != "cnf")
    assert not cycles, f"modules on an import cycle: {cycles}"


def _layer(module: str) -> str:
    for layer, prefixes in (("training", TRAINING), ("plotting", PLOTTING), ("front", FRONT)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return "core"


def test_layers_point_one_way() -> None:
    graph = _graph()
    for module in graph:
        reached = {_layer(m) for m in _reach(graph, module)}
        layer = _layer(module)
        if layer == "core" and module != "cnf":
            assert reached <= {"core"}, f"core module {module} imports {reached - {'core'}}"
        if layer in ("training", "plotting"):
            other = {"training": "plotting", "plotting": "training"}[layer]
            assert other not in reached and "front" not in reached, f"{module}: {reached}"


def test_core_and_training_never_import_matplotlib() -> None:
    graph = _graph()
    for module, path in MODULES.items():
        if _layer(module) in ("core", "training") and module != "cnf":
            names = {m for n in ast.walk(ast.parse(path.read_text())) for m in _imported(n)}
            assert not any(n.startswith("matplotlib") for n in names), module
            assert "cnf.viz" not in _reach(graph, module)


def _imported(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        return {node.module}
    return set()


def test_every_public_name_imports_and_has_a_docstring() -> None:
    for name in cnf.__all__:
        obj = getattr(cnf, name)
        assert obj is getattr(importlib.import_module(cnf._EXPORTS[name]), name)
        if callable(obj):
            assert obj.__doc__, f"cnf.{name} has no docstring"
    import cnf.training as training

    for name in training.__all__:
        assert getattr(training, name) is not None


def test_every_module_imports() -> None:
    for name in MODULES:
        if name != "cnf.__main__":  # running it is the CLI
            importlib.import_module(name)


def test_no_function_is_longer_than_60_lines_without_a_reason() -> None:
    long = []
    for module, path in MODULES.items():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            start = body[0].end_lineno + 1 if has_doc and len(body) > 1 else body[0].lineno
            lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
            if node.end_lineno - start + 1 > 60 and not any("# long:" in ln for ln in lines):
                long.append(f"{module}.{node.name}")
    assert not long, f"functions over 60 lines: {long}"


MODULE_LINES = 425  # "about 400": one concept a module, readable in a sitting


def test_no_module_is_longer_than_about_400_lines() -> None:
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    long = {m: n for m, n in lines.items() if n > MODULE_LINES}
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


# --- checkpoints written before the model's arguments had their own key --------------------


def test_a_version_1_checkpoint_loads_and_gives_its_numbers_again() -> None:
    ckpt = load_checkpoint(DATA / "v1_toy.pt")  # written by cnf 0.1.0 (format version 1)
    assert ckpt["version"] == VERSION and ckpt["model_args"]["hidden"] == [8, 8]
    assert ckpt["dataset"] == {"name": "8gaussians", "seed": 0, "options": {}}
    run = load_run(DATA / "v1_toy.pt")
    report = json.loads((DATA / "v1_toy_report.json").read_text())
    x = torch.as_tensor(run.dataset().test(100), dtype=torch.float32)
    with torch.no_grad():
        nll = -run.model.log_prob(x).double().mean().item()
    assert nll == pytest.approx(report["nll"], abs=1e-5)  # the report that version wrote


def test_a_version_1_tabular_run_resumes(tmp_path: Path) -> None:
    from cnf.training import TrainConfig, train

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DATA / "v1_iris.pt", run / "last.pt")
    shutil.copy(DATA / "v1_iris.pt", run / "best.pt")
    result = train(TrainConfig(), run, resume=True, progress=False, changes={"iters": 6})
    assert result.iteration == 6 and math.isfinite(result.report["nll"])
    assert load_checkpoint(run / "last.pt")["model_args"]["table"]["preprocess"] == "whiten"


def test_a_version_2_image_checkpoint_loads_nested_and_gives_its_numbers_again() -> None:
    """Version 2 kept every option flat (a U-Net's beside a conv field's); version 3 nests
    the solvers and the image field of the data's kind, and drops the others."""
    ckpt = load_checkpoint(DATA / "v2_digits_unet.pt")  # written by the cnf before nesting
    args = ckpt["model_args"]
    assert args["image"]["field"] == {"kind": "unet", "width": 4, "resolutions": 2, "depth": 1,
                                      "dropout": 0.0, "scale_shift": True}  # fmt: skip
    assert args["table"] is None and "conv_layer" not in str(args)
    assert args["eval_solver"]["step_size"] == 0.25 and args["eval_solver"]["max_nfe"] == 10_000
    assert ckpt["config"]["fm"]["time_sampling"] == "logit-normal"
    assert ckpt["config"]["adaptation"]["size"] == 16
    run = load_run(DATA / "v2_digits_unet.pt")
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8) % 17 + 0.5
    with torch.no_grad():
        log_p = run.model.log_prob(x, generator=torch.Generator().manual_seed(0))
    expected = json.loads((DATA / "v2_digits_unet.json").read_text())["log_prob"]
    torch.testing.assert_close(log_p, torch.tensor(expected), rtol=0, atol=1e-4)


def test_a_version_2_run_of_two_phases_resumes(tmp_path: Path) -> None:
    from cnf.training import TrainConfig, train

    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt"):
        shutil.copy(DATA / "v2_digits_unet.pt", run / name)
    result = train(TrainConfig(), run, resume=True, progress=False,
                   changes={"finetune_iters": 3, "validity_size": 2})  # fmt: skip
    assert result.iteration == 7 and math.isfinite(result.report["nll"])
    saved = load_checkpoint(run / "last.pt")
    assert saved["version"] == VERSION and saved["config"]["finetune_iters"] == 3


def test_a_checkpoint_of_an_unknown_version_is_refused_in_one_line(tmp_path: Path) -> None:
    from cnf.checkpoint import CheckpointError

    ckpt = torch.load(DATA / "v1_toy.pt", weights_only=True)
    torch.save({**ckpt, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match=r"version 99 checkpoint; this cnf reads versions 1"):
        load_run(tmp_path / "v99.pt")
