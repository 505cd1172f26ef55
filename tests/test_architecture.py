"""The architecture's rules that import-linter does not check (docs/architecture.md):

- no import circle in ``flexunet`` or ``search``, function-local imports included (grimp's graph);
- one home for names: no string literal outside ``search/keys.py`` and ``search/paths.py``
  equals an attribute key or a run-folder file name that they define;
- Optuna's and Keras' private names only in the adapters (``search/store/_internals.py``,
  ``flexunet/_keras_internals.py``);
- the package picture in docs/architecture.md is the one the code draws.

Each scanner is first shown a small offending example, so that a scanner that finds nothing
cannot pass for a clean code base.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = {ROOT / "search" / "store" / "_internals.py", ROOT / "flexunet" / "_keras_internals.py"}
NAME_HOMES = {ROOT / "search" / "keys.py", ROOT / "search" / "paths.py"}


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions: the first
    statement of a body when it is a bare string (what Python itself stores as ``__doc__``).
    Prose there may name a key or a file; only code is held to the rules."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


# --- import circles -------------------------------------------------------------------------------


def circles(package: str, path: Path) -> list[list[str]]:
    """Every import circle among ``package``'s modules (strongly connected components of
    grimp's import graph, which counts imports inside functions too)."""
    import grimp

    sys.path.insert(0, str(path))
    try:
        graph = grimp.build_graph(package, cache_dir=None)
    finally:
        sys.path.remove(str(path))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_circle_scan_finds_a_circle_held_by_a_function_local_import(tmp_path: Path) -> None:
    package = tmp_path / "circled"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circled import b\n")
    (package / "b.py").write_text("def late():\n    from circled import a\n    return a\n")
    (package / "c.py").write_text("from circled import a\n")
    assert circles("circled", tmp_path) == [["circled.a", "circled.b"]]


@pytest.mark.parametrize("package", ["flexunet", "search"])
def test_no_import_circles(package: str) -> None:
    assert circles(package, ROOT) == []


# --- one home for names -----------------------------------------------------------------------------


def _home_values() -> tuple[dict[str, str], dict[str, str]]:
    """(value -> constant) for the string constants of keys and paths, and (template ->
    function) for paths' name builders (``fold_model(k)`` is ``best_model_fold{}.keras``)."""
    from search import keys, paths

    values = {}
    for module in (keys, paths):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str):
                values.setdefault(value, f"{module.__name__}.{name}")
    marker = 7919
    templates = {}
    for name, function in vars(paths).items():
        if inspect.isfunction(function) and function.__module__ == paths.__name__:
            signature = inspect.signature(function)
            if list(signature.parameters) == ["k"]:
                templates[function(marker).replace(str(marker), "{}")] = f"search.paths.{name}"
    return values, templates


def _plain_word(value: str) -> bool:
    """A value that is an ordinary word ("folds", "host", "artifacts"), also a key of other
    formats (the study file's TOML, a plan's JSON) or of command lines: it is checked where it
    would name an attribute, not everywhere. A value with ``_``, ``.`` or a space is ours alone
    and checked everywhere."""
    return value.isalpha() and value.islower()


def _attribute_key_nodes(tree: ast.AST) -> Iterator[ast.Constant]:
    """String literals in the places where they name a trial's or a study's attribute:
    ``set_user_attr("k", ...)``, ``user_attrs["k"]``, ``user_attrs.get("k")``, ``"k" in
    user_attrs``, ``user_attrs={"k": ...}`` (and the same for system attrs)."""
    def attrs_of(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr in ("user_attrs", "system_attrs")

    # Names bound to a trial's or study's attrs (``attrs = trial.user_attrs``) count as them.
    aliases = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and attrs_of(node.value)
               for target in node.targets if isinstance(target, ast.Name)}

    def attrs_owner(node: ast.AST) -> bool:
        return attrs_of(node) or isinstance(node, ast.Name) and node.id in aliases

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("set_user_attr", "set_system_attr") and node.args:
                yield from (a for a in node.args[:1] if isinstance(a, ast.Constant))
            if node.func.attr in ("set_trial_user_attr", "set_trial_system_attr"):
                yield from (a for a in node.args if isinstance(a, ast.Constant))
            if node.func.attr == "get" and attrs_owner(node.func.value) and node.args:
                yield from (a for a in node.args[:1] if isinstance(a, ast.Constant))
            for keyword in node.keywords:
                if keyword.arg in ("user_attrs", "system_attrs") and isinstance(keyword.value, ast.Dict):
                    yield from (key for key in keyword.value.keys if isinstance(key, ast.Constant))
        elif isinstance(node, ast.Subscript) and attrs_owner(node.value) and isinstance(node.slice, ast.Constant):
            yield node.slice
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and any(
                attrs_owner(c) for c in node.comparators):
            yield node.left


def _constant_definitions(tree: ast.Module) -> set[int]:
    """Ids of the literals that define an upper-case constant (``MODEL_FILE = "..."``, also in
    a class or as a tuple of names): where flexunet, which cannot import search, spells the
    file names that search's paths mirror."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            names += [e.id for t in node.targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)]
            if names and all(n.isupper() for n in names):
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                found.update(id(v) for v in values if isinstance(v, ast.Constant))
    return found


def name_repeats(source: str, where: str, *, file_names_only: bool = False) -> list[str]:
    """Literals of ``source`` that repeat what keys or paths define (docstrings aside). With
    ``file_names_only`` (flexunet): only paths' file names, and those may define a constant."""
    values, templates = _home_values()
    if file_names_only:
        from search import paths

        values = {v: n for v, n in values.items() if n.startswith(paths.__name__)}
    tree = ast.parse(source)
    skip = _docstrings(tree) | (_constant_definitions(tree) if file_names_only else set())
    keyed = {id(node) for node in _attribute_key_nodes(tree)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            name = values.get(node.value)
            if name and (not _plain_word(node.value) or id(node) in keyed or file_names_only):
                found.append(f"{where}:{node.lineno}: {node.value!r} is {name}")
        elif isinstance(node, ast.JoinedStr) and not file_names_only:
            template = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
            if template in templates:
                found.append(f"{where}:{node.lineno}: f-string {template!r} is {templates[template]}")
    return found


def test_the_names_scan_finds_repeated_keys_and_file_names() -> None:
    source = textwrap.dedent('''
        """Docstrings may say "epochs_run" and best_model.keras."""
        def f(trial, k):
            trial.set_user_attr("epochs_run", 3)            # a key, everywhere
            trial.set_user_attr("host", "h")                # a plain word, as an attribute key
            spec = {"folds": 3}                             # a plain word elsewhere: another format's key
            attrs = trial.user_attrs
            return attrs.get("folds"), f"best_model_fold{k}.keras", "best_model.keras"
    ''')
    assert sorted(line.split(": ", 1)[1] for line in name_repeats(source, "x.py")) == sorted([
        "'epochs_run' is search.keys.EPOCHS_RUN", "'host' is search.keys.HOST", "'folds' is search.keys.FOLDS",
        "f-string 'best_model_fold{}.keras' is search.paths.fold_model", "'best_model.keras' is search.paths.MODEL_FILE"])
    assert name_repeats('MODEL_FILE = "best_model.keras"\nLOG = "train_log.csv"\n', "f.py", file_names_only=True) == []
    assert name_repeats('open("train_log.csv")\n', "f.py", file_names_only=True) == [
        "f.py:1: 'train_log.csv' is search.paths.LOG_FILE"]


def test_keys_and_file_names_have_one_home() -> None:
    found = []
    for path in _sources("search"):
        if path not in NAME_HOMES:
            found += name_repeats(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    for path in _sources("flexunet"):
        found += name_repeats(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), file_names_only=True)
    assert found == []


def test_paths_spells_flexunets_file_names_as_flexunet_does() -> None:
    """paths repeats the names flexunet writes (it cannot import them: importing flexunet.train
    loads TensorFlow, and every `flexunet` command imports paths)."""
    from flexunet import callbacks, config, train
    from flexunet.data import ct_ich
    from search import paths

    assert (paths.MODEL_FILE, paths.LOG_FILE, paths.CURVES_FILE) == (train.MODEL_FILE, train.LOG_FILE, train.CURVES_FILE)
    assert (paths.LAST_CHECKPOINT, paths.TRAIN_STATE) == (callbacks.LAST_CHECKPOINT, callbacks.TRAIN_STATE)
    assert paths.CONFIG_FILE == config.CONFIG_FILE and paths.SPLIT_FILE == ct_ich.SPLIT_FILE


# --- Optuna's and Keras' private names ------------------------------------------------------------------

_LIBRARIES = ("optuna", "optuna.storages", "optuna.storages.journal", "optuna.samplers", "optuna.pruners",
              "optuna.study", "optuna.trial", "optuna.artifacts", "optuna.distributions", "optuna_integration",
              "optuna_dashboard", "keras", "keras.callbacks", "keras.layers", "keras.models", "keras.optimizers",
              "keras.backend", "keras.ops", "keras.utils")
_LIBRARY_ROOTS = ("optuna", "optuna_integration", "optuna_dashboard", "keras")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def library_private_names() -> frozenset[str]:
    """Every private (single-underscore) name of the public modules of Optuna and Keras and of
    the classes they expose."""
    found = set()
    for module_name in _LIBRARIES:
        module = importlib.import_module(module_name)
        for name in dir(module):
            if _private(name):
                found.add(name)
            value = getattr(module, name, None)
            if inspect.isclass(value):
                found.update(n for n in dir(value) if _private(n))
    return frozenset(found)


def _defined_names(tree: ast.AST) -> set[str]:
    """The private names a module defines itself (functions, classes, variables, attributes
    assigned, parameters, import aliases)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.alias):
            found.add(node.asname or node.name.split(".")[0])
    return {n for n in found if _private(n)}


def private_uses(sources: dict[str, str], library: frozenset[str]) -> list[str]:
    """Where the modules ``sources`` (name -> text) reach a private name of Optuna or Keras: an
    import of a private module, an attribute or a string naming a library's private name that
    the project does not define itself, and a method that overrides one."""
    trees = {where: ast.parse(text) for where, text in sources.items()}
    ours = set().union(*(_defined_names(tree) for tree in trees.values())) if trees else set()
    classes = {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    theirs = library - ours
    found = []
    for where, tree in trees.items():
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                parts = module.split(".")
                if parts[0] in _LIBRARY_ROOTS and (any(_private(p) for p in parts) or parts[:2] == ["keras", "src"]):
                    found.append(f"{where}:{node.lineno}: imports {module}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _LIBRARY_ROOTS:
                found += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
            if isinstance(node, ast.Attribute) and node.attr in theirs:
                found.append(f"{where}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in theirs \
                    and id(node) not in skip:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.ClassDef):
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
                if bases - classes - {"object"}:  # it derives from a library's class
                    found += [f"{where}:{item.lineno}: overrides {node.name}.{item.name}" for item in node.body
                              if isinstance(item, ast.FunctionDef) and item.name in library]
    return found


def test_the_private_names_scan_finds_each_kind_of_use() -> None:
    library = library_private_names()
    assert {"_get_stale_trial_ids", "_storage", "_symbolic_build"} <= library
    source = textwrap.dedent('''
        import optuna
        from optuna.storages._heartbeat import is_heartbeat_enabled
        from keras.src import ops

        class Storage(optuna.storages.RDBStorage):
            def _get_stale_trial_ids(self, study_id):
                return []

        def f(study, network):
            network._symbolic_build(data_batch=None)
            return getattr(study, "_storage")
    ''')
    assert [line.split(": ", 1)[1] for line in private_uses({"m.py": source}, library)] == [
        "imports optuna.storages._heartbeat", "imports keras.src", "overrides Storage._get_stale_trial_ids",
        "._symbolic_build", "'_storage'"]


def test_optuna_and_keras_private_names_only_in_the_adapters() -> None:
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
               for p in _sources("search", "flexunet") if p not in ADAPTERS}
    assert private_uses(sources, library_private_names()) == []


# --- the picture ---------------------------------------------------------------------------------------


def test_the_package_picture_is_the_codes() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import draw_packages
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = draw_packages.DOC.read_text(encoding="utf-8")
    assert draw_packages.render(text, draw_packages.mermaid(draw_packages.edges())) == text, (
        "docs/architecture.md's package picture is stale: run python docs/draw_packages.py")
    assert "search_runtime --> search_trial" in text  # the picture draws real edges
