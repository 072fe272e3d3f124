"""Layers only look down: _C <- ops <- nn <- router <- hf, parallel, tokens <- demo <- cli.

Read statically from every module's imports (at any depth: imports inside functions count too).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grouter"
RANK = {"_C": -1, "ops": 0, "nn": 1, "router": 2, "hf": 3, "parallel": 3, "tokens": 3, "demo": 4, "cli": 5,
        "__main__": 6}  # the compiled library under ops; the command line runs the demo


def layer_of(module: str) -> str:
    """grouter.x.y -> x (the package's top-level unit)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            yield from (n for n in names if n.startswith("grouter"))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("grouter"))


def test_no_module_imports_a_higher_or_sibling_layer():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("grouter",) + path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        mine = layer_of(module)
        if mine == "__init__":
            continue  # the package root re-exports the public API
        for target in imports_of(path, module):
            theirs = layer_of(target)
            theirs = theirs if theirs in RANK else "__init__"  # grouter.__version__ and the like
            if theirs == mine:
                continue
            if theirs == "__init__":
                if mine not in ("cli", "demo"):  # the root imports every layer
                    bad.append(f"{module} imports the package root ({target})")
                continue
            if RANK[theirs] >= RANK[mine]:
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_distill_and_the_hf_package_work_without_transformers():
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # import transformers -> ImportError
        import torch, grouter, grouter.hf
        from grouter import nn as gnn

        class Source(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(50, 16)
                self.moe = gnn.MoE(16, 8, 4, 2, router="softmax")

            def forward(self, ids):
                return self.moe(self.embed(ids))

        g = grouter.Grouter(50, 4, 2, d_model=16, n_layers=1, n_heads=2)
        batches = [torch.randint(0, 50, (2, 8)) for _ in range(3)]
        before = grouter.router.kl_to_source(g, Source(), batches)
        grouter.distill(g, Source(), batches, steps=3, progress=False)
        assert "transformers" not in sys.modules or sys.modules["transformers"] is None
        print("ok", before)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_every_public_class_has_a_docstring():
    import importlib

    missing = []
    for name in ("grouter", "grouter.ops", "grouter.nn", "grouter.router", "grouter.parallel", "grouter.hf"):
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if isinstance(obj, type) and not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert not missing, missing
