"""The import direction of the layout, read from the source files with ast (not from what this process imported).

modules/ is the method: it imports nothing of utils/ (the training run, data, analysis), tools/ (programs)
or tests/. A top-level script (the training scripts, get_rate.py, reproduce.py) reaches, through the
project's own modules, neither tools/ nor tests/: those are run, never imported by what users run.
"""
import ast
import functools
import glob
import os

import pytest

from tests.conftest import REPO

PACKAGES = ('modules', 'utils', 'tools', 'tests')
SCRIPTS = sorted(os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(REPO, '*.py')))
TRAINING_SCRIPTS = ('mnist_conv', 'fashion_mlp', 'nmnist_conv', 'cifar_alexnetf', 'cifar_cifarnetf', 'get_rate')


def module_file(name):
    """The file of the project's module `name` (dotted), or None when it is not one of the project's."""
    base = os.path.join(REPO, *name.split('.'))
    for path in (base + '.py', os.path.join(base, '__init__.py')):
        if os.path.isfile(path):
            return path
    return None


def module_name(path):
    """The dotted name of the project's file at path."""
    parts = os.path.relpath(path, REPO)[:-len('.py')].split(os.sep)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


@functools.cache
def imported_names(path):
    """Every module name the file at path imports: import / from-import statements anywhere in it (relative
    ones resolved), the submodules a from-import names, and importlib.import_module('...') with a literal."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    package = module_name(path) if path.endswith('__init__.py') else module_name(path).rpartition('.')[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)] if package else []
                base = '.'.join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f'{base}.{alias.name}' for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == 'import_module' and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return frozenset(names)


@functools.cache
def project_imports(name):
    """The project's modules that importing `name` runs directly: its imports, with their parent packages."""
    found = set()
    for imported in imported_names(module_file(name)):
        parts = imported.split('.')
        for end in range(1, len(parts) + 1):
            prefix = '.'.join(parts[:end])
            if module_file(prefix) is not None:
                found.add(prefix)
    found.discard(name)
    return frozenset(found)


def reached(name):
    """{module: the module that imported it} for every project module that importing `name` runs."""
    parents, todo = {name: None}, [name]
    while todo:
        current = todo.pop()
        for child in project_imports(current):
            if child not in parents:
                parents[child] = current
                todo.append(child)
    return parents


def chain(parents, name):
    """The import path from the start to name, as 'a -> b -> c'."""
    path = []
    while name is not None:
        path.append(name)
        name = parents[name]
    return ' -> '.join(reversed(path))


def package_modules(package):
    """The dotted names of every .py file under the project's package."""
    return sorted(module_name(path) for path in glob.glob(os.path.join(REPO, package, '**', '*.py'), recursive=True))


def forbidden(parents, packages):
    """The import chains from the start into any of packages."""
    return [chain(parents, name) for name in sorted(parents) if name.split('.')[0] in packages]


@pytest.mark.parametrize('name', package_modules('modules'))
def test_modules_import_nothing_above_them(name):
    """Nothing in modules/ reaches utils/, tools/ or tests/."""
    chains = forbidden(reached(name), ('utils', 'tools', 'tests'))
    assert not chains, 'modules/ imports above itself: ' + '; '.join(chains)


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_reach_neither_tools_nor_tests(script):
    """No top-level script reaches tools/ or tests/ through the project's modules."""
    chains = forbidden(reached(script), ('tools', 'tests'))
    assert not chains, f'{script}.py reaches what only tests and tools may import: ' + '; '.join(chains)


def test_the_training_scripts_are_all_checked():
    """The training scripts are among the checked ones, and the import walk sees through them to the method,
    through relative and function-level imports alike, and into tools/ where a tool imports one."""
    assert set(TRAINING_SCRIPTS) <= set(SCRIPTS)
    for script in TRAINING_SCRIPTS:
        assert 'modules.snn' in reached(script), script
    assert 'utils.training.run' in reached('mnist_conv')
    assert 'tools.fakedata' in reached('tools.smoke')  # tools may import tools: the walk must see it
    assert forbidden(reached('tools.smoke'), ('tools',)) != []
