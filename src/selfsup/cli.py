"""`selfsup pretrain | eval | report | export | tokenizer | methods | cache` — the command line.

Every command takes ``key.sub=value`` overrides after its options. Errors a user can fix
(bad config, missing data, unreadable checkpoint) print one line and exit with status 2;
Ctrl-C during pretraining saves a checkpoint first and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from selfsup import __version__
from selfsup.errors import ConfigError, SelfSupError

EMBEDDED_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _split_overrides(extra: list[str]) -> list[str]:
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise SelfSupError(f"unrecognized arguments: {' '.join(bad)} (overrides look like optim.lr=0.5)")
    return extra


def _print_table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    width = max(len(k) for k, _ in rows)
    if title:
        print(f"\n{title}")
        print("-" * max(len(title), width + 20))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# --------------------------------------------------------------------------------------
# pretrain


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfsup.checkpoint import load_checkpoint
    from selfsup.config import load_config
    from selfsup.evaluate import final_knn
    from selfsup.train.logging import write_summary
    from selfsup.train.trainer import Trainer

    if args.data is not None:
        overrides = [f"data.source={args.data}", *overrides]
    if args.out is not None:
        overrides = [f"trainer.out_dir={args.out}", *overrides]
    if args.init is not None:
        if args.resume:
            raise SelfSupError("--init starts a new run from another run's encoder; a --resume run has its own weights")
        overrides = [f"backbone.init={args.init}", *overrides]
    resume_ckpt, run_dir = None, None
    if args.resume:
        run_dir = Path(args.resume)
        ckpt_path = run_dir / "last.ckpt" if run_dir.is_dir() else run_dir
        run_dir = ckpt_path.parent
        resume_ckpt = load_checkpoint(ckpt_path)
        # the run's own config, then a recipe if given, then overrides (e.g. trainer.epochs=200)
        cfg = load_config(args.config, overrides, base_tree=resume_ckpt["config"])
    else:
        cfg = load_config(args.config or EMBEDDED_CONFIG, overrides)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume_ckpt)
    cfg = trainer.cfg  # with what the data fixed (a text run's tokenizer)
    if trainer.is_main:
        where = {"memory": "in memory", "stream": "streamed", "shards": "from shards"}[trainer.data_mode]
        print(f"selfsup {__version__}: {cfg.method.name} on {cfg.data.source} ({len(trainer.dataset):,} samples "
              f"{where}), backbone {cfg.backbone.name}, {trainer.device} {trainer.precision}, world size "
              f"{trainer.world}, {trainer.total_steps} steps of batch {cfg.data.batch_size}, lr {trainer.lr:.3g}\n"
              f"data: {trainer.data_note}\nrun directory: {trainer.run_dir}", file=sys.stderr)
        if trainer.init_report is not None:
            r = trainer.init_report
            print(f"initialized from {r['source']}: {r['loaded']} of {r['total']} backbone tensors"
                  + (f"; {r['summary']}" if r["summary"] else ""), file=sys.stderr)
    summary = trainer.fit()
    if not trainer.is_main:
        return 0
    if summary["stopped_early"]:
        write_summary(summary, trainer.run_dir)
        print(f"stopped at step {trainer.step}; resume with: selfsup pretrain --resume {trainer.run_dir}",
              file=sys.stderr)
        return 130
    if summary["finished"] and getattr(trainer.method, "language_model", False):
        from selfsup.evaluate import language_model_scores

        try:  # the held-out loss and perplexity a language model is judged by
            summary["language_model"] = language_model_scores(trainer.method, cfg, device=trainer.device,
                                                              precision=trainer.precision)
        except SelfSupError as err:
            summary["language_model"] = {"skipped": str(err)}
    if cfg.eval.final_knn and summary["finished"] and _forecasts(trainer.method, cfg):
        from selfsup.evaluate import final_forecast

        try:  # a long series has no labels: it is judged by forecasting with the frozen encoder
            summary["forecast"] = final_forecast(trainer.method, cfg, trainer.device, trainer.precision)
        except SelfSupError as err:
            summary["forecast"] = {"skipped": str(err)}
    elif cfg.eval.final_knn and summary["finished"]:
        try:
            summary["knn"] = final_knn(trainer.method, cfg, trainer.device, trainer.precision)
        except SelfSupError as err:  # unlabeled data: training is still fine, say why no kNN
            summary["knn"] = {"skipped": str(err)}
    t = summary["timings"]
    t["total_seconds_this_session"] = time.perf_counter() - t0  # setup, training and the final kNN
    t["total_seconds"] = t["wall_seconds_earlier_segments"] + t["total_seconds_this_session"]
    write_summary(summary, trainer.run_dir)
    _print_pretrain_summary(summary)
    return 0


def _forecasts(method, cfg) -> bool:
    """Whether a run is judged by forecasting: a series method on one long series."""
    if method.modality != "series":
        return False
    from selfsup.data.series import is_long_series

    return is_long_series(cfg.data.source)


def _print_pretrain_summary(summary: dict) -> None:
    t = summary["timings"]
    rows = [("method", summary["method"]),
            ("steps", f"{summary['position']['step']} / {summary['position']['total_steps']}"),
            ("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a")]
    lm = summary.get("language_model") or {}
    if "loss" in lm:
        rows.append((f"held-out loss ({lm['split']})", f"{lm['loss']:.4f} nats/token, perplexity {lm['perplexity']:.2f}, "
                                                      f"accuracy {lm['accuracy']:.1f}% ({lm['tokens']:,} tokens)"))
    elif "skipped" in lm:
        rows.append(("held-out loss", f"skipped: {lm['skipped']}"))
    rows += _knn_rows(summary.get("knn", {}))
    rows += _forecast_rows(summary.get("forecast", {}))
    rows += _time_rows(t)
    for unit in ("images", "tokens", "series"):
        if t.get(f"{unit}_per_second"):
            rows.append(("throughput", f"{t[f'{unit}_per_second']:.0f} {unit}/s"))
    if summary["data"]["skipped_images"]:  # unreadable, over the pixel limit, a link already followed
        reasons = summary["data"].get("skip_reasons") or {}
        why = f" ({', '.join(f'{n} {reason}' for reason, n in reasons.items())})" if reasons else ""
        rows.append(("files skipped", f"{summary['data']['skipped_images']}{why}"))
    if summary["bad_steps_skipped"]:
        rows.append(("non-finite steps skipped", str(summary["bad_steps_skipped"])))
    if summary["monitor"].get("alarm_steps"):
        rows.append(("collapse alarms (steps)", str(summary["monitor"]["alarm_steps"])))
    if summary["monitor"].get("uniform_alarm_steps"):
        rows.append(("uniform-prediction alarms (steps)",
                     f"{summary['monitor']['uniform_alarm_steps']} (the loss sits at ln K: collapsed head)"))
    rows.append(("run directory", summary["run_dir"]))
    _print_table(rows, "pretraining summary")


def _knn_rows(knn: dict) -> list[tuple[str, str]]:
    """The trained kNN score, the random-init mean it is compared with (and its spread over the init
    seeds), and the gain beside the binomial standard error of the trained score."""
    if "skipped" in knn:
        return [("kNN", f"skipped: {knn['skipped']}")]
    if "trained" not in knn:
        return []
    k = next(iter(knn["trained"]))
    trained = knn["trained"][k]["top1"]
    rows = [(f"kNN top-1 ({k}), pretrained", f"{trained:.1f}%")]
    if "random_init" in knn:
        rand = knn["random_init"][k]
        seeds = len(knn.get("random_init_runs", [])) or 1
        spread = (f"mean of {seeds} seeds, {rand['top1_min']:.1f}-{rand['top1_max']:.1f}" if seeds > 1
                  else "one seed")
        rows.append((f"kNN top-1 ({k}), random init", f"{rand['top1']:.1f}% ({spread})"))
        p, n = trained / 100, knn.get("test_samples")
        se = f" (± {100 * (p * (1 - p) / n) ** 0.5:.1f} binomial s.e. of the trained score)" if n else ""
        rows.append(("gain from pretraining", f"{trained - rand['top1']:+.1f} points{se}"))
    if knn.get("leave_one_out"):
        rows.append(("kNN scored on", "the training images, leave-one-out (the data has no test split)"))
    return rows


def _forecast_rows(forecast: dict) -> list[tuple[str, str]]:
    """Test MSE / MAE of the frozen-encoder forecast per horizon, at random init and of the input window."""
    if "skipped" in forecast:
        return [("forecast", f"skipped: {forecast['skipped']}")]
    if "horizons" not in forecast:
        return []
    from selfsup.eval.forecast import forecast_table

    return [(f"forecast {name}", line) for name, line in forecast_table(forecast)]


def _time_rows(t: dict) -> list[tuple[str, str]]:
    """Training time (in optimizer steps) and total time (setup, checkpoints, final kNN included); after
    a resume both cover every segment of the run, and the total of this session follows."""
    segments = t.get("segments", 1)
    total = t.get("total_seconds", t.get("total_seconds_this_session", t["wall_seconds_this_session"]))
    if segments == 1:
        return [("training time (steps)", f"{t['train_seconds']:.1f} s"), ("total time", f"{total:.1f} s")]
    return [(f"training time (steps, all {segments} segments)", f"{t['train_seconds']:.1f} s"),
            (f"total time (all {segments} segments)", f"{total:.1f} s"),
            ("total time (this session)", f"{t['total_seconds_this_session']:.1f} s")]


# --------------------------------------------------------------------------------------
# eval


def _result_path(arg: str | None, default: Path) -> Path:
    """Where an evaluation's JSON goes; its folder is made now, before the work, so an unwritable
    ``--out`` fails in a second rather than after a long evaluation."""
    out = Path(arg) if arg else default
    _check_output_file(out, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_output_file(path: Path, what: str) -> None:
    """Results are written to a temp file that then replaces ``path``; over a folder that fails, and
    over a device or a pipe (``/dev/full``, ``/dev/stdout``) it would put a plain file in its place."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file (a folder, a device or a pipe); "
                          "give the path of a file to write")


def _check_eval_args(args: argparse.Namespace) -> None:
    """Settings out of range fail here, in one line, before a checkpoint is loaded or a feature computed."""
    counts = []
    if args.protocol in ("finetune", "forecast", "attentive") or (args.protocol == "linear" and args.solver != "lbfgs"):
        if args.epochs is not None:
            counts.append(("--epochs", args.epochs, 1))
    if args.protocol == "fewshot":
        counts += [("--n-way", args.n_way, 2), ("--episodes", args.episodes, 1)]
    if args.protocol == "plan":
        counts += [("--samples", args.samples, 10), ("--iterations", args.iterations, 1)]
        if args.limit is not None:
            counts.append(("--limit", args.limit, 1))
    for name, value, least in counts:
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from selfsup.checkpoint import write_text_atomic
    from selfsup.eval import diagnose, few_shot, format_table
    from selfsup.evaluate import (
        checkpoint_tag,
        eval_device,
        labeled_features,
        load_method,
        run_knn,
        run_linear,
        same_images,
    )

    _check_eval_args(args)
    device, precision = eval_device(args.device)
    if args.precision:
        precision = args.precision
    if args.protocol == "finetune":
        return cmd_finetune(args, overrides)
    method, cfg, path = load_method(args.checkpoint, device, overrides)
    out = _result_path(args.out, path.parent / f"eval_{args.protocol}.json")
    if args.protocol == "perplexity":
        return _perplexity(method, cfg, path, out, args, device, precision)
    if args.protocol == "forecast":
        return _forecast(method, cfg, path, out, args, device, precision)
    if args.protocol == "attentive":
        return _attentive(method, cfg, path, out, args, device, precision)
    if args.protocol == "plan":
        return _plan(method, cfg, path, out, args, device)
    if method.use_channels_last(True):  # what training used; faster convs
        method = method.to(memory_format=torch.channels_last)
    feats = labeled_features(method, cfg, device=device, source=args.data, train_split=args.train_split,
                             test_split=args.test_split, cache_dir=path.parent / "features",
                             cache_tag=checkpoint_tag(path), precision=precision)
    same = same_images(feats)
    if same and args.protocol in ("linear", "svm"):
        print("selfsup: warning: the test split is the training split (no test/ folder): the probe is "
              "scored on the images it was fit on; pass --test-split or a folder with train/ and test/",
              file=sys.stderr)
    if args.protocol == "knn":
        result = run_knn(feats, cfg)
    elif args.protocol == "linear" and args.solver == "lbfgs":  # small sets: exact logistic regression
        from selfsup.eval import logistic_regression

        result = logistic_regression(*feats[:4])
    elif args.protocol == "svm":  # TS2Vec's protocol: an RBF SVM, C cross-validated
        from selfsup.eval import svm_probe

        result = svm_probe(*feats[:4])
    elif args.protocol == "linear":
        result = run_linear(feats, epochs=args.epochs or 100, optimizer=args.solver, seed=cfg.trainer.seed)
    elif args.protocol == "fewshot":
        try:
            result = few_shot(feats[2], feats[3], n_way=args.n_way, episodes=args.episodes, seed=cfg.trainer.seed)
        except ValueError as err:  # too few classes for --n-way, or a setting out of range
            raise ConfigError(f"{err}; change --n-way or --episodes") from None
    else:
        result = diagnose(feats[2], feats[3])
    result = {"protocol": args.protocol, "checkpoint": str(path), "data": args.data or cfg.data.source,
              "train_samples": int(feats[0].shape[0]), "test_samples": int(feats[2].shape[0]),
              **({"test_is_train": True, "leave_one_out": args.protocol == "knn"} if same else {}), **result}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    print(format_table({k: v for k, v in result.items() if k not in ("curve", "train_loss")}))
    print(f"saved {out}")
    return 0


def _attentive(method, cfg, path: Path, out: Path, args: argparse.Namespace, device, precision: str) -> int:
    """V-JEPA's attentive probe: cross-attention pooling of the frozen tokens, then a linear classifier."""
    from selfsup.checkpoint import write_text_atomic
    from selfsup.errors import DataError
    from selfsup.eval import format_table
    from selfsup.eval.attentive import attentive_probe
    from selfsup.evaluate import embed_dataset, load_feature_split

    from selfsup.core.method import Method

    if type(method).embed_tokens is Method.embed_tokens:  # refused before any data is read
        method.embed_tokens({})
    tokens = []
    for role, split in (("train", args.train_split or cfg.data.train_split), ("test", args.test_split or cfg.data.test_split)):
        dataset = load_feature_split(cfg, split, args.data)
        if not dataset.has_labels:
            raise DataError(f"{args.data or cfg.data.source!r} split {split!r} has no labels; the attentive probe "
                            "needs a labeled set")
        tokens.extend(embed_dataset(method, dataset, device=device, batch_size=cfg.data.eval_batch_size,
                                    precision=precision, desc=f"{role} tokens", workers=cfg.data.workers, tokens=True))
    result = attentive_probe(*tokens, epochs=args.epochs or 20, seed=cfg.trainer.seed, device=device)
    result = {"protocol": "attentive", "checkpoint": str(path), "data": args.data or cfg.data.source,
              "train_samples": int(tokens[0].shape[0]), "test_samples": int(tokens[2].shape[0]),
              "tokens_per_sample": int(tokens[0].shape[1]), **result}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    print(format_table(result))
    print(f"saved {out}")
    return 0


def _plan(method, cfg, path: Path, out: Path, args: argparse.Namespace, device) -> int:
    """V-JEPA 2-AC's planner on the test clips: the cross-entropy method toward each clip's later frame, scored by
    whether the planned motion has the clip's direction (eval/planning.py)."""
    from selfsup.checkpoint import write_text_atomic
    from selfsup.eval import format_table
    from selfsup.eval.planning import plan_directions
    from selfsup.evaluate import load_feature_split

    if not hasattr(method, "rollout"):
        raise ConfigError(f"plan needs an action-conditioned world model (vjepa2_ac); {cfg.method.name} is not one")
    dataset = load_feature_split(cfg, args.test_split or cfg.data.test_split, args.data)
    if not hasattr(dataset, "motion"):
        raise ConfigError("plan scores planned motion against the clips' known motion: the embedded clips "
                          "(data.source=embedded-video) carry it")
    horizon = args.horizon or 2
    if not 1 <= horizon < method.encoder.num_frames:
        raise ConfigError(f"--horizon {horizon}: must be between 1 and {method.encoder.num_frames - 1} (frames - 1)")
    result = plan_directions(method, dataset, horizon=horizon, samples=args.samples, iterations=args.iterations,
                             limit=args.limit, seed=cfg.trainer.seed, device=device)
    result = {"protocol": "plan", "checkpoint": str(path), "data": args.data or cfg.data.source, **result}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    print(format_table(result))
    print(f"saved {out}")
    return 0


def _perplexity(method, cfg, path: Path, out: Path, args: argparse.Namespace, device, precision: str) -> int:
    """Held-out loss, perplexity and token accuracy of a language model (CLM, MLM, T5)."""
    from selfsup.checkpoint import write_text_atomic
    from selfsup.eval import format_table
    from selfsup.evaluate import language_model_scores

    if not hasattr(method, "lm_scores"):
        raise ConfigError(f"perplexity scores language models (clm, mlm, t5); {cfg.method.name} is a "
                          f"{method.modality} method")
    try:
        scores = language_model_scores(method, cfg, device=device, split=args.test_split, source=args.data,
                                       precision=precision)
    except NotImplementedError as err:
        raise ConfigError(str(err)) from None
    result = {"protocol": "perplexity", "checkpoint": str(path), "data": args.data or cfg.data.source, **scores}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    print(format_table(result))
    print(f"saved {out}")
    return 0


def _forecast(method, cfg, path: Path, out: Path, args: argparse.Namespace, device, precision: str) -> int:
    """Test MSE / MAE of a linear forecasting head on the frozen encoder, per horizon (eval/forecast.py)."""
    from selfsup.checkpoint import write_text_atomic
    from selfsup.eval.forecast import DEFAULT_HORIZONS, forecast_probe, forecast_table

    if method.modality != "series":
        raise ConfigError(f"forecasting reads a time-series encoder; {cfg.method.name} is a "
                          f"{method.modality} method")
    horizons = tuple(args.horizons or DEFAULT_HORIZONS)
    if min(horizons) < 1:
        raise ConfigError(f"--horizons must be positive, got {list(horizons)}")
    if args.finetune:
        from selfsup.eval.forecast import finetune_forecast

        rows = {str(h): finetune_forecast(method, cfg, device=device, source=args.data, horizon=h,
                                          freeze_epochs=args.freeze_epochs, epochs=args.epochs or 20,
                                          precision=precision) for h in horizons}
        result = {"protocol": "forecast-finetune", "checkpoint": str(path), "data": args.data or cfg.data.source,
                  "seq_len": cfg.data.seq_len, "horizons": rows}
        out = out.with_name(out.stem + "_finetune.json")
        write_text_atomic(out, json.dumps(result, indent=2, default=float))
        _print_table([(f"H={h} fine-tuned", f"MSE {r['mse']:.4f}  MAE {r['mae']:.4f}  (val MSE {r['val_mse']:.4f}, "
                                            f"{r['phase']} epoch {r['epoch']})") for h, r in rows.items()],
                     f"forecasting after fine-tuning, {result['data']}, context {cfg.data.seq_len} steps")
        print(f"saved {out}")
        return 0
    result = forecast_probe(method, cfg, device=device, source=args.data, horizons=horizons,
                            epochs=args.epochs or cfg.eval.forecast_epochs, precision=precision,
                            plot=out.with_suffix(".png"))
    result = {"checkpoint": str(path), **result}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    _print_table(forecast_table(result), f"forecasting, {result['data']}, context {result['seq_len']} steps "
                                         "(standardized MSE / MAE on the test split)")
    print(f"saved {out}" + (f" and {result['plot']}" if result.get("plot") else ""))
    return 0


# --------------------------------------------------------------------------------------
# export / methods


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfsup.checkpoint import write_text_atomic
    from selfsup.eval import format_table
    from selfsup.eval.finetune import finetune
    from selfsup.evaluate import eval_device, load_feature_split, load_method, load_split

    device, _ = eval_device(args.device)
    method, cfg, path = load_method(args.checkpoint, device, overrides)
    out = _result_path(args.out, path.parent / "eval_finetune.json")
    if method.modality not in ("image", "text"):
        raise ConfigError(f"fine-tuning has recipes for image and text encoders; {cfg.method.name} is a "
                          f"{method.modality} method: probe it with selfsup eval linear / knn"
                          + (" / forecast" if method.modality == "series" else ""))
    # images are augmented from the raw split; texts come as tokenized examples
    load = load_feature_split if method.modality == "text" else load_split
    train = load(cfg, args.train_split or cfg.data.train_split, args.data)
    test = load(cfg, args.test_split or cfg.data.test_split, args.data)
    epochs = args.epochs or (3 if load is load_feature_split else 100)  # BERT: 3 epochs; MAE ViT-B: 100
    result = finetune(method, train, test, epochs=epochs, device=device, seed=cfg.trainer.seed)
    result = {"protocol": "finetune", "checkpoint": str(path), "data": args.data or cfg.data.source, **result}
    write_text_atomic(out, json.dumps(result, indent=2, default=float))
    print(format_table({k: v for k, v in result.items() if k not in ("curve", "train_loss", "lr", "recipe")}))
    print(f"saved {out}")
    return 0


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfsup.report import report_command

    report_command(args.run_dir, args.data, device=args.device, max_points=args.max_points,
                   projection=args.projection)
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfsup.export import export_encoder

    _check_output_file(Path(args.out), "the export target")
    meta = export_encoder(args.checkpoint, args.out)
    print(f"wrote {meta['tensors']} tensors ({meta['library']} names) to {meta['path']}")
    if meta.get("note"):
        print(f"note: {meta['note']}")
    return 0


def cmd_methods(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfsup.registry import METHODS, get_method

    get_method("simclr")  # imports selfsup.methods, which registers everything
    rows = [(name, cls.family, ",".join(cls.modalities), cls.paper) for name, cls in sorted(METHODS.items())]
    w = [max(len(r[i]) for r in rows + [("method", "family", "modalities", "paper")]) for i in range(3)]
    print(f"{'method':<{w[0]}}  {'family':<{w[1]}}  {'modalities':<{w[2]}}  paper")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    return 0


# --------------------------------------------------------------------------------------
# tokenizer


def cmd_tokenizer(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fit BEiT's k-means tokenizer on a recipe's training data ahead of pretraining."""
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.core.runtime import resolve_device
    from selfsup.data.loader import limit_dataset
    from selfsup.methods.beit import BEiT, tokenizer_images
    from selfsup.registry import get_modality

    if args.data is not None:
        overrides = [f"data.source={args.data}", *overrides]
    cfg = load_config(args.config, overrides)
    method = build_method(cfg)
    if not isinstance(method, BEiT):
        raise SelfSupError(f"method {cfg.method.name!r} has no tokenizer to fit (use a beit recipe)")
    dataset = get_modality("image").open(cfg, cfg.data.train_split).dataset  # data.mode's choice
    dataset = limit_dataset(dataset, cfg.data.limit)
    method = method.to(resolve_device(args.device or cfg.trainer.device))
    stats = method.fit_tokenizer(tokenizer_images(dataset))
    path = method.tokenizer.save(args.out)
    _print_table([("codes", f"{stats['codes_used']} of {stats['codes']} used"), ("patches", str(stats["patches"])),
                  ("quantization MSE", f"{stats['quantization_mse']:.4f}"), ("time", f"{stats['seconds']:.1f} s"),
                  ("saved", str(path)), ("use with", f"method.tokenizer_path={path}")], "tokenizer")
    return 0


# --------------------------------------------------------------------------------------
# data


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write an image folder as WebDataset shards with an index (data.mode=shards reads them)."""
    from selfsup.checkpoint import human_bytes
    from selfsup.data.shards import DEFAULT_SHARD_BYTES, write_shards

    if overrides:
        raise SelfSupError(f"selfsup data shard takes no overrides: {' '.join(overrides)}")
    max_bytes = int(args.shard_mib * 2**20) if args.shard_mib else DEFAULT_SHARD_BYTES
    summary = write_shards(args.src, args.out, args.split, max_samples=args.shard_samples, max_bytes=max_bytes)
    rows = [("samples", f"{summary.samples:,}"), ("shards", f"{summary.shards} in {summary.out}"),
            ("image bytes", human_bytes(summary.bytes)), ("time", f"{summary.seconds:.1f} s")]
    for reason, count in summary.skips.counts.items():
        rows.append((f"skipped ({reason})", f"{count} (e.g. {summary.skips.examples[reason][0]})"))
    rows.append(("use with", f"--data {summary.out}  (data.mode=auto or shards)"))
    _print_table(rows, "shards")
    return 0


# --------------------------------------------------------------------------------------
# cache


def cmd_cache(args: argparse.Namespace, overrides: list[str]) -> int:
    """Show or empty the decoded-image cache (decoded folders and resized torchvision datasets)."""
    from selfsup.checkpoint import human_bytes
    from selfsup.data.cache import (
        CACHE_ENV_VAR,
        cache_entries,
        clean_cache,
        default_cache_dir,
    )

    directory = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if args.action == "clean":
        count, freed = clean_cache(directory)
        print(f"removed {count} files ({freed:,} bytes, {human_bytes(freed)}) from {directory}")
        return 0
    entries = [(path, path.stat()) for path in cache_entries(directory)]
    total = sum(stat.st_size for _, stat in entries)
    print(f"decoded-image cache: {directory} (move it with {CACHE_ENV_VAR}, empty it with: selfsup cache clean)")
    print(f"{len(entries)} entries, {total:,} bytes ({human_bytes(total)})")
    for path, stat in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
        print(f"  {path.name}  {human_bytes(stat.st_size)}  {when}")
    return 0


# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain an encoder (default: SimCLR on the embedded CIFAR-10 subset)")
    pre.add_argument("--config", help="YAML recipe, e.g. configs/simclr/cifar10.yaml")
    pre.add_argument("--data", help="embedded | cifar10 | cifar100 | stl10 | a folder of images")
    pre.add_argument("--out", help="parent folder of the run directory (trainer.out_dir)")
    pre.add_argument("--resume", metavar="RUN", help="continue a stopped run (its directory or a .ckpt)")
    pre.add_argument("--init", metavar="PATH", help="start from the encoder of a run, .ckpt or exported "
                     ".safetensors (backbone.init); mismatched keys are reported")
    pre.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint's encoder")
    ev.add_argument("protocol", choices=["knn", "linear", "svm", "attentive", "fewshot", "diagnose", "finetune",
                                        "perplexity", "forecast", "plan"])
    ev.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory")
    ev.add_argument("--data", help="labeled data to evaluate on (default: the pretraining data)")
    ev.add_argument("--train-split", help="split used as kNN bank / probe training set")
    ev.add_argument("--test-split", help="split used for queries / probe evaluation")
    ev.add_argument("--out", help="JSON file for the results (default: RUN/eval_<protocol>.json)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", choices=["32", "bf16-mixed", "16-mixed"])
    ev.add_argument("--epochs", type=int, help="linear probe / fine-tuning epochs (default 100; fine-tuning a "
                    "text encoder: 3, BERT's)")
    ev.add_argument("--solver", choices=["sgd", "adamw", "lbfgs"], default="sgd",
                    help="linear probe: SGD/AdamW on cached features, or L-BFGS logistic regression")
    ev.add_argument("--horizons", type=int, nargs="+", help="forecast: steps ahead (default 96 192 336 720)")
    ev.add_argument("--finetune", action="store_true", help="forecast: fine-tune the encoder with the head (PatchTST's "
                    "protocol: --freeze-epochs of the head only, then --epochs (default 20) of everything) instead of "
                    "the linear probe")
    ev.add_argument("--freeze-epochs", type=int, default=10, help="forecast --finetune: epochs of the head alone")
    ev.add_argument("--horizon", type=int, help="plan: steps from the first frame to the goal frame (default 2)")
    ev.add_argument("--samples", type=int, default=100, help="plan: action sequences sampled per round")
    ev.add_argument("--iterations", type=int, default=5, help="plan: cross-entropy-method rounds")
    ev.add_argument("--limit", type=int, help="plan: score only the first N test clips")
    ev.add_argument("--n-way", type=int, default=5, help="few-shot classes per episode")
    ev.add_argument("--episodes", type=int, default=100, help="few-shot episodes")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write the encoder's weights as safetensors (torchvision/timm names)")
    ex.add_argument("checkpoint")
    ex.add_argument("out")
    ex.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="write RUN/report/report.html with curves, embedding map and more")
    rp.add_argument("run_dir")
    rp.add_argument("--data", help="labeled data for the embedding map (default: the run's)")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--max-points", type=int, default=2000)
    rp.add_argument("--projection", choices=["auto", "umap", "tsne", "pca"], default="auto")
    rp.set_defaults(func=cmd_report)

    tk = sub.add_parser("tokenizer", help="fit BEiT's k-means visual tokenizer ahead of pretraining")
    tk.add_argument("action", choices=["fit"])
    tk.add_argument("--config", required=True, help="a beit recipe, e.g. configs/beit/cifar10.yaml")
    tk.add_argument("--out", required=True, help="codebook file (.safetensors or .pt) for method.tokenizer_path")
    tk.add_argument("--data", help="training data (default: the recipe's)")
    tk.add_argument("--device", help="default: the recipe's trainer.device")
    tk.set_defaults(func=cmd_tokenizer)

    me = sub.add_parser("methods", help="list the registered methods with their papers")
    me.set_defaults(func=cmd_methods)

    da = sub.add_parser("data", help="write an image folder as WebDataset shards (data.mode=shards)")
    da.add_argument("action", choices=["shard"])
    da.add_argument("src", help="an image folder (class subfolders give labels), or its parent holding SPLIT/")
    da.add_argument("out", help="an empty folder for the shards and index.npz")
    da.add_argument("--split", default="train", help="the split to write when SRC holds split folders (default train)")
    da.add_argument("--shard-samples", type=int, default=10_000, help="samples per shard at most (default 10000)")
    da.add_argument("--shard-mib", type=float, help="MiB of images per shard at most (default 1024)")
    da.set_defaults(func=cmd_data)

    ca = sub.add_parser("cache", help="show (info) or empty (clean) the decoded-image cache")
    ca.add_argument("action", choices=["info", "clean"])
    ca.add_argument("--dir", help="cache folder (default: $SELFSUP_CACHE_DIR, else ~/.cache/selfsup/decoded)")
    ca.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, _split_overrides(extra))
    except SelfSupError as err:
        print(f"selfsup: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be written or read, a full disk: say which, no traceback
        if args.verbose:
            raise
        print(f"selfsup: error: {err} (rerun with -v for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
