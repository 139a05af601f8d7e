"""`local_eval replay --bundle DIR`: run a Kaggle bundle's kernel.py as the server runs it, then score it.

The competition's files appear at /kaggle/input/<competition> and the bundle at /kaggle/input/<dataset>, both
read-only; /kaggle/working is the only writable folder Kaggle gives, capped at --disk-gb; the network is off;
the run gets --cpus CPUs and --ram-gb of memory. kernel.py installs its pydegensac wheel offline, as on the
server: the interpreter sees every package of this one except pydegensac. When root: a private mount namespace
(bind mounts, read-only; a tmpfs of --disk-gb for /kaggle/working) and a new network namespace (`unshare -m -n`,
util-linux). Not root: the same layout as read-only copies in OUT/sandbox/kaggle, kernel.py's paths pointed at it,
/kaggle/working a watched folder, and the network not cut (the report says so). RAM: a watcher sums the RSS of
the run's processes every WATCH_EVERY_S and kills them above --ram-gb (no cgroup is touched).

OUT/report.json records the sandbox: network cut or not, input read-only, CPUs, the RAM and disk limits and their
peaks, how each was imposed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from common.cli import (
    UserError,
    atomic_write_text,
    check_not_an_input,
    check_positive,
    mark_output_dir,
    partial_dir,
    swap_in,
)
from local_eval.replay import (
    REPORT_KIND,
    check_report_folder,
    competition_paths,
    read_timing,
    run_with_limit,
    score_if_present,
    tail,
)

log = logging.getLogger("sandbox")

KAGGLE = Path("/kaggle")
KERNEL = "kernel.py"
SCRIPT_WORK = "/tmp/landmark-work"  # where the bundle's kernel.py keeps main.py's --work (export/bundle.py)
WATCH_EVERY_S = 0.5
HIDDEN_PACKAGE = "pydegensac"  # what kernel.py installs from its wheels
DEFAULT_DISK_GB = 20.0  # Kaggle's /kaggle/working
REPO = Path(__file__).resolve().parent.parent


def bundle_names(bundle: Path) -> tuple[str, str, str]:
    """(dataset, competition, task) of a bundle folder (export/bundle.py's metadata files)."""
    try:
        dataset = json.loads((bundle / "dataset-metadata.json").read_text())["id"].split("/")[-1]
        competition = json.loads((bundle / "kernel-metadata.json").read_text())["competition_sources"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise UserError(
            f"--bundle {bundle}: not a bundle of `python -m export bundle` (its metadata files: "
            f"{str(err).splitlines()[0] or type(err).__name__})"
        ) from None
    if not (bundle / KERNEL).is_file():
        raise UserError(f"--bundle {bundle}: no {KERNEL}")
    return dataset, competition, "retrieval" if "retrieval" in competition else "recognition"


def python_without(package: str, folder: Path) -> Path:
    """A venv in folder whose interpreter sees this interpreter's packages except `package` (and pip installs into
    the venv): what Kaggle's image is to kernel.py before it installs its wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--symlinks", str(folder)], check=True)
    shown = folder / "kit-site"
    shown.mkdir()
    for site in {Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()}:
        for entry in site.iterdir():
            if not entry.name.lower().startswith(package) and not (shown / entry.name).exists():
                (shown / entry.name).symlink_to(entry)
    purelib = subprocess.run(
        [str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "kit-site.pth").write_text(f"import site; site.addsitedir({str(shown)!r})\n")
    return folder / "bin" / "python"


def read_only_copy(source: Path, target: Path) -> None:
    """source copied to target, every write bit off."""
    shutil.copytree(source, target, symlinks=False)
    for path in [target, *target.rglob("*")]:
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)


class Limits(NamedTuple):
    """The sandbox's machine: /kaggle/working's size, the CPUs, the memory (None: this machine's)."""

    disk_gb: float = DEFAULT_DISK_GB
    cpus: int | None = None
    ram_gb: float | None = None


NO_LIMITS = Limits()  # /kaggle/working at its default size, this machine's CPUs and memory


def check_limits(limits: Limits) -> None:
    disk_gb, cpus, ram_gb = limits
    check_positive("--disk-gb", disk_gb)
    if ram_gb is not None:
        check_positive("--ram-gb", ram_gb)
    available = len(os.sched_getaffinity(0))
    if cpus is not None and not 1 <= cpus <= available:
        raise UserError(f"--cpus {cpus}: expected 1 to {available} (the CPUs this process may use)")


def replay_bundle(
    competition: Path,
    task: str,
    bundle: Path,
    out: Path,
    limit_h: float,
    limits: Limits = NO_LIMITS,
    extra_args: list[str] | None = None,
) -> dict:
    """Run the bundle's kernel.py in the sandbox, score /kaggle/working/submission.csv, write out/report.json.
    As replay's: the run goes into a partial folder beside OUT, swapped in whole at the end (a timeout's or a
    crash's report too); Ctrl-C, a bad input or an error leave the old OUT as it was."""
    bundle = Path(bundle).resolve()
    _, competition_name, bundle_task = bundle_names(bundle)
    if bundle_task != task:
        raise UserError(f"--bundle {bundle} runs {bundle_task} ({competition_name}), not --task {task}")
    check_positive("--limit-h", limit_h)
    check_limits(limits)
    data, solution = competition_paths(Path(competition), task)
    out = Path(out).resolve()
    check_not_an_input("--out", out, [("--competition", competition), ("--bundle", bundle)])
    check_report_folder(out)
    with partial_dir(out) as new:
        report = run_in_sandbox(SandboxRun(data, solution, task, bundle, new, limit_h, limits, extra_args or []))
        mark_output_dir(new, kind=REPORT_KIND)
        swap_in(new, out)
    return report


class SandboxRun(NamedTuple):
    """One run of a bundle's kernel.py: the competition's data and solution, the bundle, the folder it reports in
    (the partial one, which becomes OUT), its limits and the script's extra flags."""

    data: Path
    solution: Path
    task: str
    bundle: Path
    out: Path
    limit_h: float
    limits: Limits
    extra_args: list[str]


def run_in_sandbox(run: SandboxRun) -> dict:
    """kernel.py in the sandbox, under the watcher and the time limit; its submission scored: the report."""
    dataset, competition_name, _ = bundle_names(run.bundle)
    disk_gb, cpus, ram_gb = run.limits
    sandbox = run.out / "sandbox"
    (sandbox / "work").mkdir(parents=True)
    spec = {
        "data": str(run.data.resolve()),
        "bundle": str(run.bundle),
        "competition": competition_name,
        "dataset": dataset,
        "disk_gb": disk_gb,
        "cpus": cpus,
        "ram_gb": ram_gb,
        "sandbox": str(sandbox),
        "out": str(run.out),
        "python": str(python_without(HIDDEN_PACKAGE, sandbox / "python")),
        "args": run.extra_args,
        "root": os.geteuid() == 0,
    }
    (sandbox / "spec.json").write_text(json.dumps(spec, indent=1))
    inner = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from local_eval.sandbox import "
        f"inside; sys.exit(inside({str(sandbox / 'spec.json')!r}))",
    ]
    if spec["root"]:
        for mount_point in (KAGGLE, Path(SCRIPT_WORK)):  # the namespace mounts over them; the host's stay empty
            mount_point.mkdir(exist_ok=True)
        inner = ["unshare", "--mount", "--net", "--propagation", "private", "--", *inner]
    log.info("running %s's %s in the sandbox (%s)", run.bundle, KERNEL, "namespaces" if spec["root"] else "copies")
    status, seconds = run_with_limit(inner, run.out / "script.log", run.limit_h * 3600)
    inside_report = sandbox / "inside.json"
    facts = json.loads(inside_report.read_text()) if inside_report.is_file() else {"error": "the sandbox did not start"}
    if facts.get("exit_code") not in (None, 0) and status == "ok":
        status = "crash"
    if facts.get("killed"):
        status = "killed"
    work = sandbox / "work"
    report = {
        "status": status,
        "seconds": round(seconds, 3),
        "python": spec["python"],
        "bundle": str(run.bundle),
        "sandbox": facts,
        "final": score_if_present(run.task, run.solution, run.out / "submission.csv"),
        "global_only": score_if_present(run.task, run.solution, work / "submission_global_only.csv"),
        "timing": read_timing(work),
    }
    if status != "ok":
        report["log_tail"] = tail(run.out / "script.log")
    atomic_write_text(run.out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_sandbox(facts: dict) -> str:
    """The sandbox's lines of the replay's summary."""
    if "error" in facts:
        return f"  sandbox: {facts['error']}"
    net, ram, disk = facts["network"], facts["ram"], facts["disk"]
    return "\n".join(
        [
            f"  sandbox ({facts['mode']}): network {'cut' if net['cut'] else 'NOT cut'} ({net['how']}); inputs "
            f"{'read-only' if facts['input_read_only'] else 'WRITABLE'}; {facts['cpus']['count']} CPUs",
            f"  RAM peak {ram['peak_gb']:.2f} GB of {ram['limit_gb'] or 'no'} limit ({ram['how']})",
            f"  disk peak {disk['peak_gb']:.2f} GB of {disk['limit_gb']:g} GB ({disk['how']})",
        ]
    )


# --- inside the sandbox (its own process: in the namespaces when root) ---
def inside(spec_path: str) -> int:
    """Lay the sandbox out, run kernel.py under the watcher, copy its submission out; facts to inside.json."""
    spec = json.loads(Path(spec_path).read_text())
    sandbox = Path(spec["sandbox"])
    kaggle = KAGGLE if spec["root"] else sandbox / "kaggle"
    inputs = kaggle / "input"
    working = kaggle / "working"
    facts = lay_out_namespaces(spec, inputs, working) if spec["root"] else lay_out_copies(spec, kaggle, inputs)
    kernel = inputs / spec["dataset"] / KERNEL
    if not spec["root"]:  # the kernel's paths, pointed at the copies
        kernel = sandbox / KERNEL
        kernel.write_text(
            (inputs / spec["dataset"] / KERNEL)
            .read_text()
            .replace(f"{KAGGLE}/", f"{kaggle}/")
            .replace(SCRIPT_WORK, str(sandbox / "work"))
        )
    facts["input_read_only"] = all(read_only(inputs / name) for name in (spec["competition"], spec["dataset"]))
    facts["network"] = network_facts(spec["root"])
    if spec["cpus"]:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec["cpus"]])
    facts["cpus"] = {"count": len(os.sched_getaffinity(0)), "how": "CPU affinity (sched_setaffinity)"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(
        [spec["python"], str(kernel), *spec["args"]], cwd=working, env=env, stdin=subprocess.DEVNULL
    )
    peaks = watch(process, working, spec["ram_gb"], spec["disk_gb"] if not spec["root"] else None)
    facts["ram"] = {
        "limit_gb": spec["ram_gb"],
        "peak_gb": round(peaks["ram"] / 2**30, 6),
        "how": f"a watcher: RSS of the run's processes every {WATCH_EVERY_S} s, killed above the limit",
    }
    facts["disk"]["peak_gb"] = round(peaks["disk"] / 2**30, 6)
    facts.update(exit_code=process.returncode, killed=peaks["killed"])
    if (working / "submission.csv").is_file():
        shutil.copyfile(working / "submission.csv", Path(spec["out"]) / "submission.csv")
    (sandbox / "inside.json").write_text(json.dumps(facts, indent=1))
    return 0


def lay_out_namespaces(spec: dict, inputs: Path, working: Path) -> dict:
    """Root, in a private mount namespace: a tmpfs at /kaggle, the competition and the bundle bound read-only,
    a tmpfs of --disk-gb at /kaggle/working, the sandbox's own folder as the kernel's work folder in /tmp."""
    mount("-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", str(KAGGLE))
    for source, name in ((spec["data"], spec["competition"]), (spec["bundle"], spec["dataset"])):
        (inputs / name).mkdir(parents=True)
        mount("--bind", source, str(inputs / name))
        mount("-o", "remount,bind,ro", str(inputs / name))
    working.mkdir()
    mount("-t", "tmpfs", "-o", f"size={int(spec['disk_gb'] * 2**30)},mode=777", "tmpfs", str(working))
    mount("--bind", str(Path(spec["sandbox"]) / "work"), SCRIPT_WORK)
    return {
        "mode": "namespaces",
        "disk": {
            "limit_gb": spec["disk_gb"],
            "how": "a tmpfs of that size at /kaggle/working (a full disk fails writes there, as on the server)",
        },
    }


def lay_out_copies(spec: dict, kaggle: Path, inputs: Path) -> dict:
    """Not root: read-only copies under the sandbox folder and a watched working folder."""
    for source, name in ((spec["data"], spec["competition"]), (spec["bundle"], spec["dataset"])):
        read_only_copy(Path(source), inputs / name)
    (kaggle / "working").mkdir()
    return {
        "mode": "copies",
        "disk": {
            "limit_gb": spec["disk_gb"],
            "how": f"a watcher: the working folder's size every {WATCH_EVERY_S} s, the run killed above the limit",
        },
    }


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def read_only(folder: Path) -> bool:
    """Whether creating a file in folder fails as on a read-only input."""
    probe = folder / ".sandbox-write-probe"
    try:
        probe.write_text("")
    except OSError as err:
        return err.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    probe.unlink()
    return False


def network_facts(namespaced: bool) -> dict:
    """Whether the network is cut: in a new network namespace, the devices there are (only lo)."""
    if not namespaced:
        return {"cut": False, "how": "not root: no network namespace, the network was NOT cut"}
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]  # this network namespace's devices
    devices = sorted(line.split(":")[0].strip() for line in lines)
    return {"cut": devices in ([], ["lo"]), "how": "a new network namespace (unshare --net)", "devices": devices}


def process_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """(the children of each process, the bytes resident in each), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children, rss


def tree_pids(root_pid: int, children: dict[int, list[int]]) -> list[int]:
    """root_pid and its descendants, parents first."""
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo += children.get(pid, [])
    return found


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


def watch(process: subprocess.Popen, working: Path, ram_gb: float | None, disk_gb: float | None) -> dict:
    """Wait for process, sampling its tree's RSS and the working folder's size: the peaks, and why it was killed
    if it went over --ram-gb (or, watched, --disk-gb)."""
    peaks = {"ram": 0, "disk": 0, "killed": None}
    while process.poll() is None:
        children, rss = process_table()
        tree = tree_pids(process.pid, children)
        peaks["ram"] = max(peaks["ram"], sum(rss.get(pid, 0) for pid in tree))
        peaks["disk"] = max(peaks["disk"], folder_bytes(working))
        over = [
            name
            for name, limit in (("ram", ram_gb), ("disk", disk_gb))
            if limit is not None and peaks[name] > limit * 2**30
        ]
        if over:
            peaks["killed"] = f"{over[0]} above its limit"
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(WATCH_EVERY_S)
    peaks["disk"] = max(peaks["disk"], folder_bytes(working))
    return peaks
