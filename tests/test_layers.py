"""Layers only look down: _C <- ops <- nn <- router <- hf, parallel, titan, tokens <- demo <- cli.

Read statically from every module's imports (at any depth: imports inside functions count too).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grouter"
RANK = {"_C": -1, "ops": 0, "nn": 1, "router": 2, "hf": 3, "parallel": 3, "titan": 3, "tokens": 3, "demo": 4, "cli": 5,
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


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("grouter",) + path.relative_to(PACKAGE).with_suffix("").parts)
        yield path, module.removesuffix(".__init__")


def test_no_import_cycles_between_modules():
    # Within a layer too: two modules that import each other (even from inside a function, which
    # only hides the cycle from the interpreter) share a piece that belongs in a third.
    known = {m for _, m in modules()}
    graph = {}
    for path, module in modules():
        if module.count(".") < 2:  # package roots re-export their modules
            continue
        targets = {t if t in known else t.rsplit(".", 1)[0] for t in imports_of(path, module)}
        graph[module] = {t for t in targets if t in known and t != module and t.count(".") >= 2}
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt not in done:
                visit(nxt, stack + [node])
        done.add(node)

    done = set()
    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


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


def test_every_op_registration_lives_in_grouter_ops():
    # The op layer owns its Python side: a fake kernel, autograd formula or implementation
    # registered elsewhere would make the ops' behaviour depend on what else was imported.
    calls = ("register_fake", "register_autograd", "register_kernel", "impl", "define", "custom_op", "Library")
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "ops":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in calls and "library" in ast.unparse(node.value):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_every_public_name_has_one_home():
    # Each name is exported by one package (the package root re-exports the main API); the others
    # import it from there without listing it again.
    import importlib

    homes = {}
    for unit in ("ops", "nn", "router", "hf", "parallel", "tokens"):
        for name in importlib.import_module(f"grouter.{unit}").__all__:
            homes.setdefault(name, []).append(unit)
    assert not {n: h for n, h in homes.items() if len(h) > 1}


def test_ops_alone_register_everything_they_need():
    # Only grouter.ops imported (the package root is empty of side effects here because of the
    # stub): expert_mlp differentiates and its fake kernel exists.
    code = textwrap.dedent("""
        import importlib.util, sys, types, torch
        from pathlib import Path
        root = Path(importlib.util.find_spec("grouter").origin).parent
        pkg = types.ModuleType("grouter"); pkg.__path__ = [str(root)]; sys.modules["grouter"] = pkg
        import grouter.ops as ops
        assert "grouter.nn" not in sys.modules
        rows = torch.randn(5, 4, requires_grad=True); off = torch.tensor([0, 2, 5])
        gu = torch.randn(2, 6, 4, requires_grad=True); dn = torch.randn(2, 4, 3, requires_grad=True)
        ops.expert_mlp(rows, off, gu, dn, "gelu").sum().backward()
        assert rows.grad is not None and gu.grad is not None and dn.grad is not None
        with torch._subclasses.FakeTensorMode():
            out = torch.ops.grouter.expert_mlp(torch.empty(5, 4), torch.empty(3, dtype=torch.long),
                                               torch.empty(2, 6, 4), torch.empty(2, 4, 3), "silu")[0]
        assert out.shape == (5, 4)
        for name in ops.GLU_ACTIVATIONS:  # the C++ kernels accept exactly the registry's names
            ops.glu(torch.randn(2, 4), name)
        try:
            ops.glu(torch.randn(2, 4), "tanh")
            raise SystemExit("an unknown activation was accepted")
        except (ValueError, RuntimeError):
            pass
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
