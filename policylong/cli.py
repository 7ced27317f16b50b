"""``policylong`` command line.

    policylong demo [--workdir DIR]                 corpus -> index -> PolicyLong vs EntropyLong
                                                    (3 stages each) -> report, on CPU
    policylong synth --out DIR [--roots N]          synthetic corpus with planted dependencies
    policylong index --config C [--overwrite]       FAISS index over the retrieval corpus
    policylong screen --config C --model DIR --out DIR
                                                    one stage dataset screened with a model
                                                    (HF folder, or Megatron checkpoint CKPT[@N])
    policylong pretrain-base --out DIR              rebuild the embedded tiny base model
    policylong train --config C --stage-dir DIR --from CKPT --to CKPT
                                                    one Megatron-Core training stage
    policylong convert --hf DIR --out CKPT          HF checkpoint -> Megatron checkpoint
    policylong export --ckpt CKPT --hf-out DIR      Megatron checkpoint -> HF checkpoint
    policylong gguf-to-hf --gguf FILE --out DIR     GGUF file (or gemma3-270m) -> HF folder
    policylong eval --model DIR --out DIR           synthetic NIAH probes per length (JSON, PNG)
    policylong run --config C [--stages 4]          the on-policy loop: screen with M_t, train
    policylong report --workdir DIR [--presets ...] per-stage report of loop runs (JSON, PNG)
    policylong align --config dgrpo --from CKPT --teacher DIR
                                                    post-training on the policy's own rollouts
                                                    (dGRPO; presets grpo, opd, sft, kd)
    policylong eval-tasks --model CKPT [CKPT ...] --out DIR
                                                    greedy task accuracy per family and length

``train``, ``convert``, ``export``, ``run`` and ``align`` run under ``torchrun`` with any
TP×PP×CP×DP layout that the world size allows (``--set parallel.tensor_parallel=2``; ``run``:
CP = 1; ``align``: TP×PP×DP); alone they are a world of one.

Config-driven commands (demo, index, screen, train, run, convert, export, report, align)
take ``--config PRESET`` (a YAML file or a shipped preset's name; repeatable, merged in
order), dotted overrides ``--set screening.percentile=5`` (repeatable) and ``--workdir DIR``;
synth, eval and pretrain-base take only their own flags. docs/cli.md lists every flag.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import sys

import torch.distributed as dist

from policylong.align.evaluate import evaluate_tasks, plot_eval, write_eval
from policylong.align.loop import run_align
from policylong.basemodel import build_base_model
from policylong.config import load_config
from policylong.demo import run_demo
from policylong.errors import ConfigError, OutputError, PolicyLongError
from policylong.evaluation import TASKS, evaluate, plot
from policylong.lm import gguf_to_hf, load_language_model
from policylong.logs import setup_logging
from policylong.megatron_ext.convert import convert_hf, export_checkpoint
from policylong.megatron_ext.parallel import destroy_distributed
from policylong.megatron_ext.plan import plan_stage
from policylong.megatron_ext.train import train_stage
from policylong.outputs import check_output, check_writable, output_lock, swap_in
from policylong.report import loop_report, summarize_report
from policylong.retrieval import build_index
from policylong.stages import run_stages, screen_once
from policylong.synthetic import generate_corpus

log = logging.getLogger("policylong")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a length, a count of roots, steps or probes)."""
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer > 0")
    return v


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed, a stage index, an iteration)."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer >= 0")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None


def _config(args):
    overrides = list(args.set or [])
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    return load_config(args.config, overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        help="YAML preset (default: the built-in demo defaults); repeat to merge several in "
        "order, e.g. a size preset then a method preset",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted override, e.g. screening.percentile=5 (repeatable)",
    )
    p.add_argument("--workdir", help="run directory (overrides the config's workdir)")


# -- commands ----------------------------------------------------------------------------------


def cmd_synth(args) -> int:
    check_output(args.out, "corpus", overwrite=args.overwrite)
    with output_lock(args.out):
        work = args.out.rstrip("/") + ".partial"
        if os.path.isdir(work):  # left by a killed synth: ours, and cheap to redo
            shutil.rmtree(work)
        counts = generate_corpus(work, num_roots=args.roots, seed=args.seed)
        swap_in(work, args.out)
    log.info("synthetic corpus in %s: %s", args.out, counts)
    return 0


def cmd_index(args) -> int:
    build_index(_config(args), overwrite=args.overwrite)
    return 0


def cmd_screen(args) -> int:
    if args.model:
        args.set = list(args.set or []) + [f"model.path={args.model}"]
    if args.stage is not None:
        args.set = list(args.set or []) + [f"stage={args.stage}"]
    cfg = _config(args)
    out = args.out or os.path.join(cfg.workdir, "runs", "screen", f"stage_{cfg.stage}")
    m = screen_once(cfg, out, overwrite=args.overwrite)
    print(
        json.dumps({"out": out, "num_sequences": m["num_sequences"], "stats": m["stats"]}, indent=2)
    )
    return 0


def cmd_pretrain_base(args) -> int:
    info = build_base_model(
        args.out, seed=args.seed, phase1_steps=args.phase1_steps, phase2_steps=args.phase2_steps
    )
    print(
        json.dumps(
            {
                k: info[k]
                for k in ("parameters", "train_seconds", "induction_accuracy", "gap_probe")
            },
            indent=2,
        )
    )
    return 0


def cmd_demo(args) -> int:
    overrides = list(args.set or [])
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
        _check_workdir(args.workdir)
    summary = run_demo(args.config, overrides, roots=args.roots)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args) -> int:
    cfg = _config(args)
    check_output(args.to, "checkpoint", resume=True)  # an existing checkpoint resumes
    if args.dry_run:
        plan = plan_stage(cfg, args.stage_dir, getattr(args, "from"), args.to, args.world_size)
        print(json.dumps(plan.summary(), indent=2))
        return 0
    with output_lock(args.to) if _is_rank0() else contextlib.nullcontext():
        res = train_stage(cfg, args.stage_dir, getattr(args, "from"), args.to)
    if _is_rank0():
        log.info("stage trained: %s", json.dumps(res))
    return 0


def cmd_convert(args) -> int:
    cfg = _config(args)
    check_output(args.out, "checkpoint", resume=True)  # convert names an existing checkpoint
    path = convert_hf(cfg, args.hf, args.out)
    if _is_rank0():
        log.info("wrote %s", path)
    return 0


def cmd_export(args) -> int:
    cfg = _config(args)
    check_output(args.hf_out, "hf", resume=True)
    path = export_checkpoint(cfg, args.ckpt, args.hf_out, args.iteration)
    if _is_rank0():
        log.info("wrote %s", path)
    return 0


def cmd_gguf_to_hf(args) -> int:
    log.info("wrote %s", gguf_to_hf(args.gguf, args.out, args.dtype))
    return 0


def cmd_run(args) -> int:
    shortcuts = {
        "loop.stages": args.stages,
        "loop.tokens_per_stage": args.tokens_per_stage,
        "loop.roots_per_stage": args.roots_per_stage,
        "data.seq_length": args.seq_length,
        "screening.screen_length": args.screen_length,
    }
    args.set = list(args.set or []) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    cfg = _config(args)
    _check_workdir(cfg.workdir)
    root = os.path.join(cfg.workdir, "runs", cfg.loop.preset)
    with output_lock(root) if _is_rank0() else contextlib.nullcontext():
        res = run_stages(cfg)
    print(json.dumps([{k: v for k, v in r.items() if k != "stats"} for r in res], indent=2))
    return 0


def cmd_align(args) -> int:
    shortcuts = {
        "model.path": args.start,
        "align.teacher": args.teacher,
        "align.steps": args.steps,
        "align.preset": args.name,
    }
    args.set = list(args.set or []) + [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    res = run_align(_config(args))
    if _is_rank0():
        print(json.dumps(res, indent=2))
    return 0


def cmd_eval_tasks(args) -> int:
    cfg = _config(args)
    check_output(args.out, "tasks_eval", resume=True)  # rewritten as a whole
    res = evaluate_tasks(
        cfg, args.model, args.tasks.split(","), args.lengths, args.n, args.seed, args.max_new,
        args.retention_n, args.retention_length, args.heldout,
    )  # fmt: skip
    if _is_rank0():
        path = write_eval(res, args.out)
        plot_eval(res, os.path.join(args.out, "tasks_eval.png"))
        log.info("wrote %s and tasks_eval.png", path)
        print(json.dumps(res, indent=2))
    return 0


def cmd_eval(args) -> int:
    check_output(args.out, "eval", resume=True)  # rewritten as a whole
    lm = load_language_model(args.model, device=args.device, dtype=args.dtype)
    tasks = tuple(args.tasks or TASKS)
    res = evaluate(lm, args.lengths, n=args.n, tasks=tasks, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"model": args.model, "seed": args.seed, "results": res}, f, indent=2)
    plot(res, os.path.join(args.out, "eval.png"))
    for task, per in res.items():
        cells = "  ".join(
            f"{k}: {v['accuracy']:.2f} (ctrl {v['control_accuracy']:.2f})" for k, v in per.items()
        )
        print(f"{task:>16}  {cells}")
    log.info("wrote %s/eval.json and eval.png", args.out)
    return 0


def cmd_report(args) -> int:
    cfg = _config(args)
    _check_workdir(cfg.workdir)
    check_output(os.path.join(cfg.workdir, "report"), "report", resume=True)
    presets = args.presets
    if not presets:
        runs = os.path.join(cfg.workdir, "runs")
        presets = sorted(
            p
            for p in (os.listdir(runs) if os.path.isdir(runs) else [])
            if os.path.isfile(os.path.join(runs, p, "loop.json"))
        )
        if not presets:
            raise ConfigError(f"{runs}: no loop run (no runs/*/loop.json); run `policylong run`")
    rep = loop_report(cfg, presets, args.lengths, n_niah=args.n)
    print(json.dumps(summarize_report(rep), indent=2))
    log.info("wrote %s", ", ".join(rep["plots"]))
    return 0


def _check_workdir(workdir: str) -> None:
    """The run directory is a folder (or can be made one) that this user can write."""
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise OutputError(f"{workdir}: the workdir is a file, not a folder")
    check_writable(workdir)


def _teardown() -> None:
    if dist.is_initialized():
        try:
            destroy_distributed()
        except RuntimeError:  # a peer already failed; its error is the one to report
            pass


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="policylong", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="CPU demo on the embedded default: corpus, index, screen")
    _add_config_args(p)
    p.add_argument(
        "--roots",
        type=positive_int,
        default=None,
        help="synthetic root documents (default: stages x roots_per_stage + 24 held out)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="per-stage report of loop runs: JSON + PNG plots")
    _add_config_args(p)
    p.add_argument("--presets", nargs="+", help="runs to report (default: every runs/*/loop.json)")
    p.add_argument(
        "--lengths", nargs="+", type=positive_int, default=[256, 512, 1024], help="probe lengths"
    )
    p.add_argument("--n", type=positive_int, default=12, help="probes per NIAH task and length")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("synth", help="write a synthetic corpus with planted dependencies")
    p.add_argument("--out", required=True, help="output folder (docs/passages/ground_truth)")
    p.add_argument("--roots", type=positive_int, default=60, help="root documents")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a synthetic corpus already in --out (swapped in when the new one is "
        "complete)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "index",
        help="build the FAISS passage index (sharded and resumable under torchrun)",
    )
    _add_config_args(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing index in retrieval.index_dir (once the new one is complete)",
    )
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("screen", help="screen root documents with a model into a stage dataset")
    _add_config_args(p)
    p.add_argument("--model", help="local HF model directory (or 'embedded')")
    p.add_argument("--out", help="stage folder to write (default WORKDIR/runs/screen/stage_T)")
    p.add_argument("--stage", type=nonneg_int, help="stage index t")
    p.add_argument("--overwrite", action="store_true", help="replace an existing stage folder")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("pretrain-base", help="rebuild the embedded tiny base model")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--phase1-steps", type=positive_int, default=600)
    p.add_argument("--phase2-steps", type=positive_int, default=2000)
    p.set_defaults(func=cmd_pretrain_base)

    p = sub.add_parser("train", help="one Megatron-Core training stage on stage datasets")
    _add_config_args(p)
    p.add_argument(
        "--stage-dir", action="append", required=True, help="stage folder (repeat to blend)"
    )
    p.add_argument(
        "--from", required=True, help="start: HF folder, 'embedded' or a Megatron checkpoint"
    )
    p.add_argument("--to", required=True, help="checkpoint folder to write (resumed if present)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, data and start checkpoint and print the parallel layout; "
        "no process group, no step (how to check a CP > 1 layout without GPUs)",
    )
    p.add_argument(
        "--world-size", type=positive_int, help="with --dry-run: the world size to plan for"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="the on-policy stage loop: T × (screen with M_t, train)")
    _add_config_args(p)
    p.add_argument("--stages", type=positive_int, help="T (= --set loop.stages=T)")
    p.add_argument("--tokens-per-stage", type=positive_int, help="training tokens per stage")
    p.add_argument("--roots-per-stage", type=positive_int, help="root documents screened per stage")
    p.add_argument("--seq-length", type=positive_int, help="target length L (= data.seq_length)")
    p.add_argument("--screen-length", type=positive_int, help="tokens of each root screened")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "align", help="post-training on the policy's rollouts: dGRPO, GRPO, OPD, SFT, KD"
    )
    _add_config_args(p)
    p.add_argument(
        "--from", dest="start", help="start policy: HF folder or checkpoint (= model.path)"
    )
    p.add_argument("--teacher", help="teacher: HF folder or Megatron checkpoint (= align.teacher)")
    p.add_argument("--steps", type=positive_int, help="rollout batches (= align.steps)")
    p.add_argument("--name", help="run name, WORKDIR/align/NAME/ (= align.preset)")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "eval-tasks", help="greedy accuracy on generated tasks per family and length (JSON, PNG)"
    )
    _add_config_args(p)
    p.add_argument("--model", nargs="+", required=True, help="HF folders or checkpoints (CKPT@N)")
    p.add_argument("--tasks", default="lookup", help="task families, comma-separated")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[256, 512])
    p.add_argument("--n", type=positive_int, default=32, help="prompts per family and length")
    p.add_argument("--seed", type=nonneg_int, default=777, help="seed of the evaluation prompts")
    p.add_argument("--max-new", type=positive_int, default=16, help="longest greedy response")
    p.add_argument(
        "--retention-n",
        type=nonneg_int,
        default=32,
        help="retention: NIAH-single probes and held-out documents per model (0: none)",
    )
    p.add_argument(
        "--retention-length",
        type=positive_int,
        default=128,
        help="retention: NIAH-single probe length",
    )
    p.add_argument(
        "--heldout",
        help="retention: corpus of held-out short documents (default: fresh synthetic texts)",
    )
    p.add_argument("--out", required=True, help="folder for tasks_eval.json and .png")
    p.set_defaults(func=cmd_eval_tasks)

    p = sub.add_parser("eval", help="synthetic long-context probes (NIAH) at several lengths")
    p.add_argument("--model", default="embedded", help="HF folder or 'embedded'")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--n", type=positive_int, default=20, help="probes per task and length")
    p.add_argument("--tasks", nargs="+", help="subset of the tasks (default: all)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="folder for eval.json and eval.png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="HF checkpoint folder -> Megatron checkpoint")
    _add_config_args(p)
    p.add_argument("--hf", required=True, help="HF folder or 'embedded'")
    p.add_argument("--out", required=True, help="Megatron checkpoint folder to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="Megatron checkpoint -> HF checkpoint folder")
    _add_config_args(p)
    p.add_argument("--ckpt", required=True, help="PolicyLong Megatron checkpoint folder")
    p.add_argument("--hf-out", required=True, help="HF folder to write")
    p.add_argument("--iteration", type=nonneg_int, help="iteration to export (default: the latest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("gguf-to-hf", help="GGUF file -> HF folder (dequantized; a start model)")
    p.add_argument("--gguf", required=True, help="a .gguf file, or gemma3-270m (its PyPI package)")
    p.add_argument("--out", required=True, help="HF folder to write (new or empty)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.set_defaults(func=cmd_gguf_to_hf)
    return ap


_SAVED_ON_INTERRUPT = {
    "screen": "screened batches are kept in OUT.partial/; rerun the same command to resume",
    "run": "finished stages, screened batches and saved checkpoints are kept under "
    "WORKDIR/runs/PRESET/; rerun the same command to resume",
    "train": "checkpoints saved so far (train.save_interval) are kept in --to; rerun the same "
    "command to resume from the last one",
    "align": "steps saved so far are kept in WORKDIR/align/NAME/ckpt; rerun the same command to "
    "resume",
    "demo": "finished parts are kept in the workdir; rerun the same command to resume",
}
"""What ``Ctrl-C`` leaves behind, per command; commands not listed write their outputs beside
and swap them in when complete, so an interrupted one left nothing and a rerun starts over."""

_USER_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
"""Disk full, read-only file system, quota exceeded: the user's to fix, named by path."""


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user-facing failure, None for any other exception (a bug, CUDA
    out of memory, an NCCL error: those keep their traceback)."""
    if isinstance(e, PolicyLongError):
        return str(e)
    if isinstance(e, OSError) and (isinstance(e, _USER_OS_ERRORS) or e.errno in _USER_ERRNOS):
        if e.filename is None:
            return str(e)
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return f"{where}: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. User-facing failures (``PolicyLongError``, a missing or unwritable
    path, a full disk) print one line and return 2 (``-v``: with the traceback); anything else
    propagates with its traceback; Ctrl-C prints what was kept and returns 130. The process
    group, when one was started, is torn down on every path."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        saved = _SAVED_ON_INTERRUPT.get(
            args.cmd, "nothing partial was kept; rerun the same command to start over"
        )
        log.error("interrupted: %s", saved)
        return 130
    except Exception as e:
        msg = user_message(e)
        if msg is None:
            raise
        if args.verbose:
            log.exception("%s", msg)
        else:
            log.error("%s", msg)
        return 2
    finally:
        _teardown()


def reference_markdown() -> str:
    """The command-line reference (docs/cli.md): every subcommand of ``build_parser()`` with its
    help and its arguments (flags, defaults, help)."""
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [
        "# Command-line reference",
        "",
        "Generated from `policylong.cli.build_parser()` by `python docs/generate.py`; do not edit",
        "by hand. `policylong -v CMD ...` logs at debug level. `--config` takes a shipped preset",
        "by name (docs/configuration.md) or a YAML file; fields are set with `--set key=value`.",
    ]
    for name, p in sub.choices.items():
        h = helps[name]
        out += ["", f"## `policylong {name}`", "", f"{h[:1].upper()}{h[1:]}.", ""]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if a.option_strings:
                flag = ", ".join(a.option_strings)
                if a.nargs != 0:
                    flag += f" {a.metavar or a.dest.upper()}" + (" ..." if a.nargs == "+" else "")
            else:
                flag = a.metavar or a.dest
            notes = ["required"] if a.required else []
            if isinstance(a, argparse._AppendAction):
                notes.append("repeatable")
            d = a.default
            if d is not None and d is not False and d != argparse.SUPPRESS:
                notes.append(f"default: `{' '.join(map(str, d)) if isinstance(d, list) else d}`")
            extra = f" ({'; '.join(notes)})" if notes else ""
            out.append(f"- `{flag}`{extra}: {a.help or ''}".rstrip(": "))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
