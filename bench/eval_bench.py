"""Evaluation at SOP's scale: exact kNN + metrics, ours against pytorch-metric-learning (PML).

    python bench/eval_bench.py [--n 60502] [--dims 512,1024] [--devices cpu,cuda] [--k 1001]
                               [--memory-gb 1.0] [--cases ours/torch,ours/faiss,ours/auto] [--out FILE.json]

Data: synthetic clustered embeddings shaped like SOP's test split: N = 60,502 items in classes of 2-12 (mean
5.35, as SOP's 60,502 images in 11,316 classes), each item its class centre plus Gaussian noise, normalised.

Cases, each in a fresh process (so peak RSS is the case's own, from /usr/bin/time -v where present, else
from RUSAGE_CHILDREN in a one-command wrapper process), per dimension and device:
  * ours/<backend>: `evaluation.evaluate_embeddings` with the default recall ks (k = 1000 neighbours): seconds
    in search and in metrics, peak RSS, and torch.cuda.max_memory_allocated on a GPU. ours/auto shows the
    backend auto chose (on the CPU, by timing both on the first queries: the times are kept in the JSON);
  * pml: AccuracyCalculator(include=(precision_at_1, mean_average_precision_at_r, r_precision), k=1001)
    .get_accuracy on the same data (faiss IndexFlatL2 under the hood): the same 1002-wide search;
  * main.py (CPU only, main.py takes no device here): the whole `python main.py --mode eval --embeddings E.npy
    --labels L.npy` call, with the default backend and with eval.backend=torch.
--cases keeps only the named cases. Cases whose libraries are missing (PML, faiss; a GPU) are skipped with a
note. Prints the CPU it ran on first (the CPU decides which CPU backend is faster), then a Markdown table,
ratios against PML on the same data and device, and the goals; writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SOP_MEAN_CLASS_SIZE = 60_502 / 11_316
RECALL_KS = [1, 10, 100, 1000]  # the config's default eval.recall_ks
CASES = ("ours/faiss", "ours/torch", "ours/auto", "pml", "main.py", "main.py eval.backend=torch")


# ---- data -----------------------------------------------------------------------------------------------
def sop_like_labels(num_items: int, rng: np.random.Generator) -> np.ndarray:
    """Class sizes 2..12 with P(size) proportional to ratio**size, the ratio set so the mean is SOP's 5.35."""
    sizes = np.arange(2, 13)
    low, high = 0.01, 1.0
    for _ in range(60):  # bisection: the mean grows with the ratio
        ratio = (low + high) / 2
        weights = ratio ** sizes
        low, high = (ratio, high) if (weights @ sizes) / weights.sum() < SOP_MEAN_CLASS_SIZE else (low, ratio)
    drawn = rng.choice(sizes, size=num_items // 2 + 1, p=weights / weights.sum())
    return np.repeat(np.arange(len(drawn)), drawn)[:num_items]


def clustered_embeddings(labels: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
    embeddings = centres[labels]
    embeddings += rng.standard_normal(embeddings.shape, dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings


def cpu_description() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and how many logical CPUs this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} of {os.cpu_count()} logical CPUs usable"


# ---- workers: one case each, in their own process -------------------------------------------------------
def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class SearchChoice(logging.Handler):
    """Keeps the backend the search ran on and, when auto timed both, their times and the predicted times of
    the rest of the search (retrieval's log records)."""

    def __init__(self, result: dict):
        super().__init__(logging.INFO)
        self.result = result

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "knn_backend"):
            self.result["knn_backend"] = record.knn_backend
        if hasattr(record, "knn_seconds"):
            self.result["knn_timed"] = record.knn_seconds
            self.result["knn_predicted"] = record.knn_predicted_seconds


def run_worker(args: argparse.Namespace) -> None:
    import torch

    embeddings, labels = np.load(args.embeddings), np.load(args.labels)
    result = {"rss_after_load_gb": resident_bytes() / 1e9}
    search_log = logging.getLogger("retrieval")
    search_log.setLevel(logging.INFO)
    search_log.addHandler(SearchChoice(result))
    device = torch.device(args.device)
    if device.type == "cuda":
        if args.worker != "pml":  # CUDA context, cuBLAS handles and kernels loaded outside the timing
            sys.path.insert(0, str(REPO_ROOT))
            from evaluation import evaluate_embeddings

            evaluate_embeddings(embeddings[:2000], labels[:2000], [1], backend=args.worker, device=args.device,
                                memory_gb=args.memory_gb)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if args.worker == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                                        k=args.k, device=device)
        values = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
        result["metrics"] = {"recall@1": values["precision_at_1"], "map@r": values["mean_average_precision_at_r"],
                             "r_precision": values["r_precision"]}
    else:
        sys.path.insert(0, str(REPO_ROOT))
        from evaluation import evaluate_embeddings

        report = evaluate_embeddings(embeddings, labels, RECALL_KS, backend=args.worker, device=args.device,
                                     memory_gb=args.memory_gb)
        result.update(seconds_search=report["seconds_search"], seconds_metrics=report["seconds_metrics"],
                      metrics={key: report[key] for key in ("recall@1", "map@r", "r_precision")})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    result["seconds_compute"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result), flush=True)


def run_measured(command: list[str]) -> dict:
    """Run a command as its own process: wall seconds, peak RSS, and its RESULT line if it prints one."""
    if shutil.which("time") and Path("/usr/bin/time").exists():
        command = ["/usr/bin/time", "-v", *command]
    else:  # a wrapper process whose only child is the command, so RUSAGE_CHILDREN is the command's own
        command = [sys.executable, __file__, "--measure", "--", *command]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    measured = {"seconds_process": wall}
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", completed.stderr)
    peak = peak or re.search(r"MEASURED_MAXRSS_KB (\d+)", completed.stdout)
    measured["peak_rss_gb"] = int(peak.group(1)) * 1024 / 1e9
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            measured.update(json.loads(line[len("RESULT "):]))
    chosen = re.search(r"exact kNN: backend=(\w+)", completed.stderr)  # main.py --debug logs the search's choice
    if chosen and "knn_backend" not in measured:
        measured["knn_backend"] = chosen.group(1)
    return measured


def measure_wrapper(command: list[str]) -> None:
    subprocess.run(command, check=True)
    print(f"MEASURED_MAXRSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", flush=True)


# ---- the benchmark --------------------------------------------------------------------------------------
def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plan_cases(devices: list[str], notes: list[str], wanted: set[str] | None = None) -> list[tuple[str, str]]:
    """(case, device) pairs that can run here; only the wanted cases when given."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from retrieval import faiss_gpu_count  # the same test as the search's own backend choice

    cases = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            notes.append("cuda: no GPU here, skipped")
            continue
        faiss_here = available("faiss") if device == "cpu" else faiss_gpu_count() > 0
        if faiss_here:
            cases.append(("ours/faiss", device))
        else:
            notes.append(f"{device}: ours/faiss skipped (faiss{'' if device == 'cpu' else ' GPU'} not installed)")
        cases += [("ours/torch", device), ("ours/auto", device)]
        if available("pytorch_metric_learning") and available("faiss"):
            cases.append(("pml", device))
        else:
            notes.append(f"{device}: PML skipped (pytorch-metric-learning or faiss not installed)")
        if device == "cpu":
            cases += [("main.py", device), ("main.py eval.backend=torch", device)]
    return [(case, device) for case, device in cases if wanted is None or case in wanted]


def case_command(case: str, device: str, files: dict, args: argparse.Namespace) -> list[str]:
    if case.startswith("main.py"):
        fitting = ",".join(str(k) for k in RECALL_KS if k < args.n)  # main.py refuses k >= N
        overrides = [*case.split()[1:], f"eval.recall_ks=[{fitting}]", f"eval.map_ks=[{1000 if args.n > 1000 else ''}]"]
        return [sys.executable, str(REPO_ROOT / "main.py"), "--mode", "eval", "--embeddings", str(files["embeddings"]),
                "--labels", str(files["labels"]), "--output", str(files["report"]), "--debug", *overrides]
    worker = "pml" if case == "pml" else case.split("/")[1]
    return [sys.executable, __file__, "--worker", worker, "--embeddings", str(files["embeddings"]),
            "--labels", str(files["labels"]), "--device", device, "--k", str(args.k),
            "--memory-gb", str(args.memory_gb)]


def run_case(case: str, device: str, files: dict, args: argparse.Namespace) -> dict:
    load = os.getloadavg()[0]  # other work on the machine skews every timing: kept in the JSON
    row = {"case": case, "device": device, "load_average_before": load,
           **run_measured(case_command(case, device, files, args))}
    if case.startswith("main.py"):  # the report holds the stage times
        report = json.loads(files["report"].read_text())
        row.update(seconds_search=report["seconds_search"], seconds_metrics=report["seconds_metrics"],
                   metrics={key: report[key] for key in ("recall@1", "map@r", "r_precision")})
    chosen = f", searched with {row['knn_backend']}" if "knn_backend" in row else ""
    timed, predicted = row.get("knn_timed"), row.get("knn_predicted")
    if timed:
        chosen += (f" (auto timed torch {timed['torch']:.2f} s, faiss {timed['faiss']:.2f} s on {timed['rows']} "
                   f"queries; predicted the rest at torch {predicted['torch']:.1f} s, faiss {predicted['faiss']:.1f} s)")
    print(f"  {case} on {device}: {row['seconds_process']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB{chosen}",
          flush=True)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Time and peak RSS over PML's on the same data and device (compute time for workers, process time for
    main.py, whose peer is PML's whole process)."""
    for row in rows:
        peer = next((r for r in rows if r["case"] == "pml" and r["dim"] == row["dim"] and r["device"] == row["device"]),
                    None)
        if peer is None or row is peer:
            continue
        time_key = "seconds_process" if row["case"].startswith("main.py") else "seconds_compute"
        row["time_vs_pml"] = row[time_key] / peer[time_key]
        row["rss_vs_pml"] = row["peak_rss_gb"] / peer["peak_rss_gb"]


def markdown(rows: list[dict]) -> str:
    def cell(row, key, form):
        return form.format(row[key]) if key in row else "–"

    lines = ["| d | device | case | search s | metrics s | compute s | process s | peak RSS GB | GPU peak GB "
             "| time / PML | RSS / PML | recall@1 | map@r |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        compute = row.get("seconds_compute", row.get("seconds_search", 0) + row.get("seconds_metrics", 0))
        chosen = row.get("knn_backend")  # shown where the case does not name it: ours/auto, main.py's default
        named = chosen is None or row["case"].endswith((f"/{chosen}", f"={chosen}"))
        case = row["case"] + ("" if named else f" ({chosen})")
        lines.append(" | ".join([
            f"| {row['dim']}", row["device"], case, cell(row, "seconds_search", "{:.1f}"),
            cell(row, "seconds_metrics", "{:.2f}"), f"{compute:.1f}", cell(row, "seconds_process", "{:.1f}"),
            cell(row, "peak_rss_gb", "{:.2f}"), cell(row, "gpu_peak_gb", "{:.2f}"), cell(row, "time_vs_pml", "{:.2f}"),
            cell(row, "rss_vs_pml", "{:.2f}"), f"{100 * row['metrics']['recall@1']:.2f}",
            f"{100 * row['metrics']['map@r']:.2f}"]) + " |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    lines = []
    for dim in sorted({row["dim"] for row in rows}):
        pml = next((r for r in rows if r["case"] == "pml" and r["dim"] == dim and r["device"] == "cpu"), None)
        ours = next((r for r in rows if r["case"] == "main.py" and r["dim"] == dim), None)
        if pml and ours:
            lines.append(f"d={dim}: whole eval call {ours['seconds_process']:.1f} s vs PML computing its 3 metrics "
                         f"{pml['seconds_compute']:.1f} s (PML process {pml['seconds_process']:.1f} s): "
                         f"{'met' if ours['seconds_process'] <= pml['seconds_compute'] else 'NOT met'}")
            lines.append(f"d={dim}: whole eval call peak RSS {ours['peak_rss_gb']:.2f} GB vs half of PML's "
                         f"{pml['peak_rss_gb'] / 2:.2f} GB: {'met' if ours['peak_rss_gb'] <= pml['peak_rss_gb'] / 2 else 'NOT met'}"
                         + ("" if dim == 512 else " (the goal is set for d=512)"))
    for row in rows:
        if "seconds_metrics" in row and row["case"] != "pml":
            share = row["seconds_metrics"] / row["seconds_search"]
            lines.append(f"d={row['dim']} {row['device']} {row['case']}: metrics {100 * share:.1f}% of search time: "
                         f"{'met' if share < 0.05 else 'NOT met'}")
    return lines


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60_502, help="items (SOP's test split: 60,502)")
    parser.add_argument("--dims", default="512,1024")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--k", type=int, default=1001, help="PML's k; ours searches max(recall ks, largest R)")
    parser.add_argument("--memory-gb", type=float, default=1.0,
                        help="the search budget in GB; 0 = the device default (1 GB on the CPU, card-sized on CUDA)")
    parser.add_argument("--noise", type=float, default=2.2,
                        help="noise norm over the unit class centre; 2.2 gives Recall@1 near 0.8 at d=512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated cases to run, of {', '.join(CASES)}; all that can run here by default")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke test: N = 3,000 at d = 64, cases ours/torch and main.py unless --cases names others")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.dims, args.cases = 3000, "64", args.cases or "ours/torch,main.py"
    unknown = set(args.cases.split(",")) - set(CASES) if args.cases else set()
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; the cases are {', '.join(CASES)}")
    return args


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.measure:
        return measure_wrapper(args.command)
    if args.worker:
        return run_worker(args)

    cpu = cpu_description()
    print(f"CPU: {cpu}", flush=True)
    notes: list[str] = []
    cases = plan_cases(args.devices.split(","), notes, set(args.cases.split(",")) if args.cases else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as folder:
        files = {"embeddings": Path(folder) / "E.npy", "labels": Path(folder) / "L.npy",
                 "report": Path(folder) / "report.json"}
        for dim in (int(d) for d in args.dims.split(",")):
            rng = np.random.default_rng(args.seed)
            labels = sop_like_labels(args.n, rng)
            np.save(files["labels"], labels)
            np.save(files["embeddings"], clustered_embeddings(labels, dim, args.noise, rng))
            print(f"d={dim}: N={args.n}, {labels.max() + 1} classes", flush=True)
            rows += [{"dim": dim, "n": args.n, **run_case(case, device, files, args)} for case, device in cases]
    add_ratios(rows)
    table, goal_lines = markdown(rows), goals(rows)
    print("\n" + table + "\n")
    print("\n".join(f"- {line}" for line in notes + goal_lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
                                        "args": vars(args) | {"out": str(args.out)}, "rows": rows, "notes": notes,
                                        "goals": goal_lines, "table": table}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
