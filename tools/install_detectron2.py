#!/usr/bin/env python3
"""Install Detectron2 into the current Python environment for loco's detection transfer.

Two routes give a working ``import detectron2``:

* upstream, built from source with its compiled ops (the normal route on a GPU cluster)::

      python -m pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'

  If that is already installed, this script says so and does nothing (``--force`` replaces it).

* loco's stand-in build (what this script installs otherwise; no compiler, no GitHub):
  Detectron2 is not on PyPI, so the script downloads the ``sal-detectron2==0.7.2`` wheel (the
  pure-Python code of upstream Detectron2, mid 2024, plus a ``_C`` built for torch 2.3.1 /
  CPython 3.10 that cannot load here), drops that ``_C*.so`` and the wheel's stray top-level
  ``tools`` package, adds loco's stand-in ``detectron2/_C.py`` (transfer/detectron2_stub/_C.py:
  every compiled op raises a clear error), rewrites the metadata (name ``detectron2``, honest
  dependencies) and repacks it as ``detectron2-0.7.2+loco-py3-none-any.whl`` with a correct RECORD,
  then pip-installs its pure-Python dependencies and the wheel (``pip uninstall detectron2``
  removes it again).  Mask R-CNN / Faster R-CNN / RetinaNet with FPN need no compiled
  Detectron2 op (ROIAlign and NMS come from torchvision); evaluate COCO with
  ``COCOEvaluator(..., use_fast_impl=False)``.

``--check`` reports which route is installed and exits 1 if neither works.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PROG = "install_detectron2"
REPO = Path(__file__).resolve().parent.parent
STUB = REPO / "transfer" / "detectron2_stub" / "_C.py"

SAL_SPEC = "sal-detectron2==0.7.2"
SAL_WHEEL = "sal_detectron2-0.7.2-cp310-none-any.whl"
SAL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
DIST_NAME = "detectron2"
DIST_VERSION = "0.7.2+loco"
WHEEL_NAME = f"{DIST_NAME}-{DIST_VERSION}-py3-none-any.whl"
FROM_SOURCE = (
    "python -m pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'"
)

# Runtime dependencies of the pure-Python code (sal-detectron2's METADATA, corrected):
# its `numpy<2` pin is dropped (the code runs on numpy 2), fvcore/iopath are added (imported
# everywhere but missing from sal's metadata; pins as in upstream setup.py), black is left out
# (only LazyConfig.to_py formats code with it), and setuptools<81 keeps pkg_resources, which
# detectron2.model_zoo imports.  tensorboard is needed by DefaultTrainer's default writers.
REQUIRES = (
    "numpy",
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "packaging",
    "setuptools<81",
)
# Members of the sal wheel that are not installed.
DROP = (
    "detectron2/_C.*.so",  # compiled for CPython 3.10 + torch 2.3.1: replaced by the stand-in
    "detectron2/_C.*.pyd",
    "tools/*",  # upstream's tools/*.py scripts as a top-level package named `tools`
    "sal_detectron2-*.dist-info/*",  # replaced by our own dist-info
    "*/__pycache__/*",
    "*.pyc",
)
# Small source edits applied at install time: (path in wheel, old text, new text, why).
# None are needed with torch 2.14 / numpy 2.4 / Pillow 13 / Python 3.11.
PATCHES: tuple[tuple[str, str, str, str], ...] = ()
# Files that must be there after repacking.
REQUIRED = (
    "detectron2/__init__.py",
    "detectron2/model_zoo/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
)

# Runs in a fresh interpreter: which Detectron2 is importable, and which _C it has.
PROBE = r"""
import importlib, importlib.metadata as md, json, os, sys, warnings
warnings.simplefilter("ignore")
dists = []
for d in md.distributions():
    files = d.files or ()
    if any(str(f).replace(os.sep, "/") == "detectron2/__init__.py" for f in files):
        dists.append([d.metadata["Name"], d.version])
print("PROBE-DISTS:" + json.dumps(dists), flush=True)  # before imports that might crash
out = {"importable": False, "dists": dists}
try:
    import detectron2
    out.update(importable=True, version=getattr(detectron2, "__version__", "?"),
               location=os.path.dirname(os.path.abspath(detectron2.__file__)))
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
if out["importable"]:
    try:
        from detectron2 import _C
        from importlib.machinery import EXTENSION_SUFFIXES
        f = getattr(_C, "__file__", None) or ""
        if getattr(_C, "__loco_standin__", False):
            out["c"] = "standin"
        elif f.endswith(tuple(EXTENSION_SUFFIXES)):
            out["c"] = "compiled"
        else:
            out["c"] = "other"
        out["c_file"] = f
    except Exception as e:
        out["c"] = "broken"
        out["c_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    errs = {}
    for mod in ("detectron2.model_zoo", "detectron2.engine", "detectron2.evaluation"):
        try:
            importlib.import_module(mod)
        except Exception as e:
            errs[mod] = f"{type(e).__name__}: {e}".splitlines()[0]
    out["module_errors"] = errs
print("PROBE:" + json.dumps(out))
"""


class InstallError(Exception):
    pass


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def probe() -> dict:
    res = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=_quiet_env()
    )
    dists = None
    for line in res.stdout.splitlines():
        if line.startswith("PROBE:"):
            return json.loads(line[len("PROBE:") :])
        if line.startswith("PROBE-DISTS:"):
            dists = json.loads(line[len("PROBE-DISTS:") :])
    rc = res.returncode
    why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
    tail = res.stderr.strip().splitlines()[-1:] or [why]
    if dists is None:
        raise InstallError(f"probing the environment failed: {tail[0]}")
    # importing detectron2 killed the interpreter (e.g. a _C built for another torch)
    return {"importable": False, "crashed": True, "dists": dists, "error": tail[0]}


def _quiet_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def describe(p: dict) -> tuple[str, str]:
    """(route, one-line description); route in {upstream, standin, other, broken, none}."""
    if p.get("crashed"):
        return "broken", f"importing detectron2 crashes the interpreter ({p['error']})"
    if not p["importable"]:
        return "none", f"detectron2 is not importable ({p.get('error', 'not installed')})"
    where = f"detectron2 {p['version']} at {p['location']}"
    if p["c"] == "compiled":
        return "upstream", f"{where}: upstream build with compiled detectron2._C ({p['c_file']})"
    if p["c"] == "standin":
        return "standin", (
            f"{where}: loco stand-in build (pure-Python sal-detectron2 0.7.2, "
            f"detectron2._C = loco stand-in without compiled ops)"
        )
    if p["c"] == "other":
        return (
            "other",
            f"{where}: detectron2._C ({p['c_file']}) is neither compiled nor loco's stand-in",
        )
    return "broken", f"{where}, but detectron2._C does not load ({p['c_error']})"


def pip(args: list[str], verbose: bool, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    if verbose:
        log("$ " + " ".join(cmd))
        res = subprocess.run(cmd, env=_quiet_env())
        if res.returncode:
            raise InstallError(f"{what} failed (pip exit {res.returncode}); see pip output above")
        return
    res = subprocess.run(cmd, capture_output=True, text=True, env=_quiet_env())
    if res.returncode:
        lines = [
            ln
            for ln in (res.stdout + res.stderr).splitlines()
            if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln
        ]
        sys.stderr.write("\n".join(lines[-25:]) + "\n")
        errs = [ln for ln in lines if ln.startswith("ERROR")]
        raise InstallError(f"{what} failed: {(errs or lines or ['pip failed'])[-1]}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sal(dest: Path, verbose: bool) -> Path:
    pip(
        [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.10",
            "--implementation",
            "cp",
            "--dest",
            str(dest),
            SAL_SPEC,
        ],
        verbose,
        f"pip download {SAL_SPEC}",
    )
    path = dest / SAL_WHEEL
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise InstallError(f"pip download {SAL_SPEC} gave {got}, expected {SAL_WHEEL}")
    return path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(sal_wheel: Path, out_dir: Path) -> tuple[Path, dict]:
    """Repack the sal wheel as a pure-Python detectron2 wheel; returns (path, build info)."""
    got = sha256_file(sal_wheel)
    if got != SAL_SHA256:
        raise InstallError(
            f"{sal_wheel.name} has sha256 {got}, expected {SAL_SHA256} (refusing an unexpected wheel)"
        )
    if not STUB.is_file():
        raise InstallError(f"stand-in module {STUB} is missing (run from a loco checkout)")
    stub = STUB.read_bytes()

    files: dict[str, bytes] = {}
    dropped: list[str] = []
    license_text = b""
    with zipfile.ZipFile(sal_wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if fnmatch.fnmatch(name, "sal_detectron2-*.dist-info/LICENSE*"):
                license_text = zf.read(info)
            if any(fnmatch.fnmatch(name, pat) for pat in DROP):
                if not fnmatch.fnmatch(name, "sal_detectron2-*.dist-info/*"):
                    dropped.append(name)
                continue
            files[name] = zf.read(info)
    if "detectron2/_C.py" in files:
        raise InstallError("the sal wheel unexpectedly ships detectron2/_C.py")
    files["detectron2/_C.py"] = stub

    applied = []
    for path, old, new, why in PATCHES:
        text = files[path].decode()
        if text.count(old) != 1:
            raise InstallError(f"patch for {path} ({why}) does not apply: source changed")
        files[path] = text.replace(old, new).encode()
        applied.append(f"{path}: {why}")
    for path in REQUIRED:
        if path not in files:
            raise InstallError(f"{sal_wheel.name} lacks {path}")

    info = {
        "source": SAL_WHEEL,
        "source_sha256": SAL_SHA256,
        "dropped": dropped,
        "patches": applied,
        "standin": "detectron2/_C.py",
        "standin_sha256": hashlib.sha256(stub).hexdigest(),
        "built_by": "loco tools/install_detectron2.py",
    }
    dist_info = f"{DIST_NAME}-{DIST_VERSION}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {DIST_VERSION}",
        "Summary: Detectron2 (pure-Python code of sal-detectron2 0.7.2) without compiled ops, "
        "repacked by loco's tools/install_detectron2.py",
        "Home-page: https://github.com/facebookresearch/detectron2",
        "Author: FAIR",
        "License: Apache-2.0",
        "Requires-Python: >=3.8",
        *(f"Requires-Dist: {r}" for r in REQUIRES),
        "",
        "Detectron2 without its compiled ops: detectron2._C is loco's pure-Python stand-in",
        "whose ops raise a clear error. Build Detectron2 from source for the compiled ops:",
        f"    {FROM_SOURCE}",
        "",
    ]
    files[f"{dist_info}/METADATA"] = "\n".join(metadata).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: loco-install_detectron2\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/top_level.txt"] = b"detectron2\n"
    files[f"{dist_info}/loco_build.json"] = (json.dumps(info, indent=2) + "\n").encode()
    if license_text:
        files[f"{dist_info}/LICENSE"] = license_text

    record_name = f"{dist_info}/RECORD"
    record = "".join(
        f"{name},{_record_hash(data)},{len(data)}\n" for name, data in sorted(files.items())
    )
    record += f"{record_name},,\n"
    files[record_name] = record.encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / WHEEL_NAME
    tmp = wheel.with_suffix(".tmp")
    # dist-info last (as the wheel spec recommends); fixed timestamps: same input, same bytes.
    order = sorted(files, key=lambda n: (n.startswith(dist_info), n == record_name, n))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in order:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, files[name])
    os.replace(tmp, wheel)
    return wheel, info


def _summary(paths: list[str]) -> str:
    """'detectron2/_C...so, tools/ (10 files)': files under detectron2/ one by one, others per folder."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        top, _, rest = path.partition("/")
        key = f"{top}/" if rest and top != "detectron2" else path
        groups.setdefault(key, []).append(path)
    parts = [f"{key} ({len(v)} files)" if key.endswith("/") else key for key, v in groups.items()]
    return ", ".join(parts) or "nothing"


def installed_stub_matches(p: dict) -> bool:
    try:
        return Path(p["c_file"]).read_bytes() == STUB.read_bytes()
    except (OSError, KeyError, TypeError):
        return False


def _remove_stale_extensions() -> None:
    """Remove _C extension modules beside the _C.py we just installed.

    One left behind by an earlier install that pip did not record (so its uninstall kept it)
    would be imported instead of our _C.py.
    """
    find = (
        "import importlib.util as u; print(u.find_spec('detectron2').submodule_search_locations[0])"
    )
    res = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True)
    if res.returncode:
        raise InstallError("installed, but the detectron2 package cannot be found")
    pkg = Path(res.stdout.strip())
    if not (pkg / "_C.py").is_file() or (pkg / "_C.py").read_bytes() != STUB.read_bytes():
        return
    for path in sorted(pkg.glob("_C.*")):
        if path.name != "_C.py" and path.name.endswith(tuple(EXTENSION_SUFFIXES)):
            path.unlink()
            log(f"removed stale {path} (left behind by an earlier install)")


def check(_args) -> int:
    p = probe()
    route, text = describe(p)
    log(text)
    if route in ("upstream", "standin"):
        for mod, err in p.get("module_errors", {}).items():
            log(f"warning: import {mod} fails: {err}")
        if route == "standin" and not installed_stub_matches(p):
            log(
                "warning: the installed stand-in _C differs from this checkout's; rerun tools/install_detectron2.py"
            )
        return 0
    if route == "other":
        log("not a route this script knows; tools/install_detectron2.py --force replaces it")
    elif route == "broken":
        log("no working route; rerun tools/install_detectron2.py (it replaces this install)")
    else:
        log("no Detectron2 installed; run tools/install_detectron2.py")
    return 1


def install(args) -> int:
    t0 = time.monotonic()
    for mod in ("torch", "torchvision"):
        if importlib.util.find_spec(mod) is None:
            raise InstallError(
                f"{mod} is not installed in {sys.prefix}: install torch and torchvision first"
            )
    p = probe()
    route, text = describe(p)
    log(text)
    errs = p.get("module_errors", {})
    if route == "upstream" and not args.force:
        for mod, err in errs.items():
            log(f"warning: import {mod} fails: {err}")
            if "pkg_resources" in err:
                log("warning: fix with: python -m pip install 'setuptools>=77.0.3,<81'")
        log(
            "upstream Detectron2 with compiled ops is installed; nothing to do (--force replaces it)"
        )
        return 0
    if route == "broken":
        log(f"replacing it (to keep compiled ops, rebuild from source instead: {FROM_SOURCE})")
    if route == "other" and not args.force:
        raise InstallError("refusing to replace an unknown detectron2._C without --force")
    if route == "standin" and not args.force:
        if not installed_stub_matches(p):
            log("the installed stand-in _C differs from this checkout's: reinstalling")
        elif errs:
            log("reinstalling: " + "; ".join(f"import {m} fails: {e}" for m, e in errs.items()))
        else:
            log("loco stand-in build is installed and imports; nothing to do (--force reinstalls)")
            return 0

    work = Path(tempfile.mkdtemp(prefix="loco-detectron2-"))
    try:
        if args.sal_wheel:
            sal = Path(args.sal_wheel)
            if not sal.is_file():
                raise InstallError(f"--sal-wheel {sal}: no such file")
            log(f"using {sal}")
        else:
            sal = download_sal(work, args.verbose)
            log(f"downloaded {sal.name} (sha256 verified)")
        wheel, info = build_wheel(sal, Path(args.wheel_dir) if args.wheel_dir else work)
        log(
            f"built {wheel.name}: dropped {_summary(info['dropped'])}; "
            f"added detectron2/_C.py (loco stand-in); patches: {'; '.join(info['patches']) or 'none'}"
        )

        others = [name for name, _ in p.get("dists", []) if name.lower() != DIST_NAME]
        for name in others:
            log(f"uninstalling {name} (it also provides the detectron2 package)")
            pip(["uninstall", "-y", name], args.verbose, f"pip uninstall {name}")

        log("installing dependencies: " + " ".join(REQUIRES))
        pip(["install", *REQUIRES], args.verbose, "installing Detectron2's dependencies")
        log(f"installing {wheel.name}")
        pip(
            ["install", "--no-deps", "--force-reinstall", str(wheel)],
            args.verbose,
            f"installing {wheel.name}",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _remove_stale_extensions()
    p = probe()
    route, text = describe(p)
    if route != "standin":
        raise InstallError(f"installed, but the check fails: {text}")
    for mod, err in p.get("module_errors", {}).items():
        raise InstallError(f"installed, but import {mod} fails: {err}")
    log(text)
    log(f"done in {time.monotonic() - t0:.0f} s (remove with: python -m pip uninstall detectron2)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python tools/install_detectron2.py",
        description=(
            "Install Detectron2 into this interpreter's environment: keep an upstream "
            "from-source build if there is one, else install loco's stand-in build "
            "(pure-Python sal-detectron2 0.7.2 repacked without compiled ops)."
        ),
        epilog=f"Upstream route (compiled ops, needs a compiler and torch): {FROM_SOURCE}",
    )
    ap.add_argument(
        "--check", action="store_true", help="report the installed route; exit 1 if none works"
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="(re)install the stand-in build even if a Detectron2 works",
    )
    ap.add_argument(
        "--sal-wheel", metavar="PATH", help=f"use this {SAL_WHEEL} instead of downloading it"
    )
    ap.add_argument(
        "--wheel-dir", metavar="DIR", help="also keep the built detectron2 wheel in DIR"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    args = ap.parse_args(argv)
    try:
        return check(args) if args.check else install(args)
    except InstallError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
