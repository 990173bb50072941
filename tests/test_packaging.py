"""pyproject.toml: the wheel holds each top-level source module once and nothing else, and both a built wheel and
``pip install .`` install into a fresh virtual environment whose modules import from outside the repository.

Offline and light: the build uses this environment's setuptools (--no-build-isolation), installs take --no-deps,
and the fresh environment sees this one's site-packages (torch, timm) through a .pth file placed after its own, so
nothing is downloaded; the test checks that the imported modules are the fresh environment's copies."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"flash_bias_triton", "flash_bias_runtime", "flash_bias_factors", "swin_transformer_v2",
            "swin_transformer", "flash_bias_adapters"}
NOT_SHIPPED = {"setup.py", "conftest.py"}
IGNORED = shutil.ignore_patterns(".git", ".venv", "third_party", ".whl", "__pycache__", ".pytest_cache", "build",
                                 "dist", "*.egg-info", "decomposed_bias", "out")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def run(cmd, cwd=None, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")
            and not k.startswith("FLASHBIAS_")}


def test_py_modules_are_the_top_level_sources():
    project = pyproject()
    listed = project["tool"]["setuptools"]["py-modules"]
    sources = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f not in NOT_SHIPPED)
    assert sorted(listed) == sources, ("pyproject.toml's py-modules must list every top-level source module once "
                                       f"(add new ones there): listed {sorted(listed)}, found {sources}")
    assert len(set(listed)) == len(listed)
    assert REQUIRED <= set(listed)
    dependencies = [d.split(">")[0].split("=")[0].strip() for d in project["project"]["dependencies"]]
    assert dependencies == ["torch", "numpy"]
    assert {"timm", "transformers"} <= set(project["project"]["optional-dependencies"])


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The repository's files (no .git, .venv, caches) to build from: a build writes build/ and *.egg-info
    next to pyproject.toml, which must not land in the work tree."""
    setuptools = pytest.importorskip("setuptools")
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # bdist_wheel moved into setuptools 70.1
        pytest.skip(f"building a wheel offline needs setuptools >= 70.1 (or the wheel package); "
                    f"setuptools {setuptools.__version__} here")
    copy = tmp_path_factory.mktemp("src") / "flashbias"
    shutil.copytree(ROOT, copy, ignore=IGNORED)
    return copy


def fresh_venv(path):
    """A virtual environment without pip whose site-packages also sees this interpreter's (after its own)."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = os.path.join(path, "Scripts" if os.name == "nt" else "bin", "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    with open(os.path.join(site, "zz_parent_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def pip_into(python, *args):
    return run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                "--disable-pip-version-check", *args], env=clean_env())


def listed_modules():
    return tuple(pyproject()["tool"]["setuptools"]["py-modules"])


def check_imports(python, site, cwd):
    modules = listed_modules()
    code = ("import importlib, os\n"
            f"for name in {modules!r}:\n"
            "    module = importlib.import_module(name)\n"
            "    print(name, os.path.realpath(module.__file__))\n"
            "import flash_bias_adapters\n"
            "print(sorted(flash_bias_adapters.__all__))\n")
    out = run([python, "-c", code], cwd=cwd, env=clean_env())
    files = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ")[0] in modules)
    assert set(files) == set(modules), out
    for name, path in files.items():
        assert path == os.path.realpath(os.path.join(site, name + ".py")), f"{name} imported from {path}"
    assert "'patch_timm', 'patch_transformers'" in out


def test_wheel_holds_each_module_once_and_installs(source_copy, tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", wheels, source_copy], env=clean_env())
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if ".dist-info/" not in n)
    assert shipped == sorted(m + ".py" for m in listed_modules()), shipped  # no package, no second copy, no tests
    python, site = fresh_venv(tmp_path / "venv")
    pip_into(python, wheel)
    check_imports(python, site, cwd=tmp_path)


def test_pip_install_dot(source_copy, tmp_path):
    python, site = fresh_venv(tmp_path / "venv")
    pip_into(python, "--no-build-isolation", source_copy)
    check_imports(python, site, cwd=tmp_path)
