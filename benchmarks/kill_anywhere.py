"""SIGKILL the pipeline at seeded random moments; every rerun must end with the bytes of an
uninterrupted run.

    python benchmarks/kill_anywhere.py --points 20 --seed 0 --workdir /tmp/kill_anywhere

The chain, each step a ``policylong`` command in its own process (forked from this one, which
has imported everything, so a step costs its work, not a Python start), as a user types it:
``synth`` -> ``index`` -> ``screen`` (embedded model) -> ``train`` (embedded model on that
stage) -> ``run`` (two on-policy stages). A rerun types the same commands again; a step whose
output is complete is skipped (``synth``, ``index``, ``screen``: as the demo does) or resumes by
itself (``train``, ``run``).

One uninterrupted chain warms up (lazy imports, caches); the next is the reference (its
duration T and the sha256 of every output file listed in ``outputs``). Then, per point, a fresh
workdir: the chain is SIGKILLed at a moment drawn uniformly from [0, T)
(``numpy.random.default_rng(seed)``), placed in the command that ran then, then rerun to the
end; every output file must have the reference's sha256. Exit status 1 when any
point differs; the JSON summary lists every point (kill time, the command it hit, the files
that differed).

Measured on the 2-core CPU machine, shared (load average 12-19):

- ``--steps 2 --points 6 --seed 2`` (synth 0.2 s, index 14.3 s): 6 kills, all inside index, all
  5 output files identical after the rerun.
- ``--steps 2 --points 5 --seed 0``: 5 kills inside index, identical.
- the full chain, ``--points 3 --seed 1`` (reference 428 s under load; kills then drawn as
  absolute times): 1 kill inside screen, 2 after the chain had finished (the load fell); all 18
  output files identical (corpus, index, screened stage, both loop stages, the .distcp shards
  of both trained checkpoints).

- the full chain, ``--points 4 --seed 3`` (reference: synth 0.7 s, index 46.7, screen 91.0,
  train 40.0, run 148.2): kills inside screen (+29.9 s) and run (+11.7 s) and two that came
  after their command had finished (index +27.2 s, run +83.3 s: the load fell); all 18 output
  files identical.

The 20-point full run (about 20 x 1.5 chains, 2-3 h on this machine) has not been run.

``tests/unit/test_kill_anywhere.py`` runs the same code on the first command at 4 points
(bounded to CI time); this script is the full version (``--steps N``: the first N commands).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time

import numpy as np

from policylong import cli

TRAIN_SETS = [
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=1e-4",
    "train.min_lr=1e-5",
    "train.train_steps=4",
    "train.save_interval=2",
]
"""Four optimizer steps, a save every two: a kill can fall before, between and after saves."""
LOOP_SETS = [*TRAIN_SETS, "loop.stages=2", "loop.roots_per_stage=10"]
BASE_SETS = ["data.seq_length=512"]


def _sets(items: list[str]) -> list[str]:
    return [x for k in items for x in ("--set", k)]


def chain(w: str, roots: int = 24) -> list[tuple[str, list[str], str | None]]:
    """(name, argv, a file whose presence means the step is complete and skipped) per step."""
    base = ["--workdir", w, *_sets(BASE_SETS)]
    return [
        (
            "synth",
            ["synth", "--out", f"{w}/corpus", "--roots", str(roots)],
            f"{w}/corpus/ground_truth.jsonl",
        ),
        ("index", ["index", *base], f"{w}/index/meta.json"),
        (
            "screen",
            ["screen", *base, *_sets(["data.num_roots=8"]), "--model", "embedded"]
            + ["--out", f"{w}/screen_0"],
            f"{w}/screen_0/manifest.json",
        ),
        (
            "train",
            [
                "train",
                *base,
                *_sets(TRAIN_SETS),
                "--stage-dir",
                f"{w}/screen_0",
                "--from",
                "embedded",
                "--to",
                f"{w}/ckpt_a",
            ],
            None,
        ),
        ("run", ["run", *base, *_sets(LOOP_SETS)], None),
    ]


def outputs(w: str) -> dict[str, str]:
    """relative path -> sha256 of every file the chain's outputs consist of: the corpus, the
    index, the screened stage and each loop stage (data, index, provenance), and the weights
    of the trained checkpoints' last iteration (dist_checkpointing shards)."""
    files = [f"corpus/{n}" for n in ("docs.jsonl", "passages.jsonl", "ground_truth.jsonl")]
    files += ["index/faiss.index", "index/passages.jsonl"]
    for st in ("screen_0", "runs/policylong/stage_0", "runs/policylong/stage_1"):
        files += [f"{st}/{n}" for n in ("data.bin", "data.idx", "provenance.jsonl")]
    for ck in ("ckpt_a", "runs/policylong/ckpt_2"):
        it = os.path.join(w, ck, "iter_0000004")
        if os.path.isdir(it):
            files += [
                os.path.relpath(os.path.join(r, n), w)
                for r, _, ns in os.walk(it)
                for n in ns
                if n.endswith(".distcp")
            ]
        else:
            files.append(f"{ck}/iter_0000004")
    out = {}
    for rel in sorted(files):
        p = os.path.join(w, rel)
        out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else ""
    return out


def _start(argv: list[str], log_fd: int | None) -> int:
    """Fork a child that runs ``policylong ARGV`` (the parent has imported everything, so a
    step costs its own work, not a Python start); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: its own process group, its output to the log
        os.setpgid(0, 0)
        if log_fd is not None:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
        rc = 1
        try:
            rc = cli.main(argv)
        finally:
            os._exit(rc)
    try:  # also here: the group must exist before the parent may kill it
        os.setpgid(pid, pid)
    except (PermissionError, ProcessLookupError):  # the child got there first, or exited
        pass
    return pid


def run_chain(w: str, kill: tuple[str, float] | None = None, log_fd: int | None = None, steps=None):
    """Run the chain in ``w``; with ``kill = (step, s)``, SIGKILL that step ``s`` seconds after
    it starts (its whole process group) and stop there. Returns ({step: seconds}, the step
    killed or '')."""
    took = {}
    for name, argv, done in chain(w)[:steps]:
        if done is not None and os.path.exists(done):
            continue
        t0 = time.time()
        pid = _start(argv, log_fd)
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                break
            if kill is not None and kill[0] == name and time.time() - t0 >= kill[1]:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return took, name
            time.sleep(0.02)
        took[name] = time.time() - t0
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            raise RuntimeError(f"{name} failed (exit {rc}) in {w}")
    return took, ""


def kill_anywhere(
    workdir: str, points: int, seed: int, log_path: str | None = None, steps: int | None = None
) -> dict:
    """The reference chain, then ``points`` kills at seeded moments of it, each rerun to the
    end and compared file by file. ``steps``: only the first ``steps`` commands of the chain
    (the CI test's bound).

    A moment is drawn uniformly over the reference's total time and placed as (the command
    running then, seconds into it): on a shared machine whose load changes, the kill still
    lands inside that command, where an absolute time could fall after the chain ended."""
    os.makedirs(workdir, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log_path else None
    ref_dir = os.path.join(workdir, "ref")
    shutil.rmtree(ref_dir, ignore_errors=True)
    warm = os.path.join(workdir, "warm")  # a first run pays one-off costs (lazy imports)
    run_chain(warm, log_fd=log_fd, steps=steps)
    shutil.rmtree(warm)
    took, _ = run_chain(ref_dir, log_fd=log_fd, steps=steps)
    ref = {k: v for k, v in outputs(ref_dir).items() if v}  # the files these steps write
    names, ends = list(took), np.cumsum(list(took.values()))
    rng = np.random.default_rng(seed)
    rows = []
    for i, at in enumerate(sorted(rng.uniform(0, ends[-1], size=points))):
        j = int(np.searchsorted(ends, at, side="right"))
        kill = (names[j], float(at - (ends[j - 1] if j else 0.0)))
        w = os.path.join(workdir, f"p{i}")
        shutil.rmtree(w, ignore_errors=True)
        _, hit = run_chain(w, kill=kill, log_fd=log_fd, steps=steps)
        run_chain(w, log_fd=log_fd, steps=steps)
        got = outputs(w)
        diff = [k for k in ref if got.get(k) != ref[k]]
        rows.append(
            {
                "kill": f"{kill[0]} + {kill[1]:.2f}s",
                "killed": hit or "(it had finished)",
                "diff": diff,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress of a long run
        shutil.rmtree(w, ignore_errors=True)
    return {
        "reference_seconds": {k: round(v, 1) for k, v in took.items()},
        "files": len(ref),
        "points": rows,
        "all_identical": all(not r["diff"] for r in rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="only the first STEPS commands of the chain")
    args = ap.parse_args()
    log = os.path.join(args.workdir, "log")
    res = kill_anywhere(args.workdir, args.points, args.seed, log, args.steps)
    print(json.dumps(res, indent=2))
    return 0 if res["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
