"""What each `grouter` command does. Each writes `<out>/report.json` (its quality figures under
"heldout", measured on held-out data only; no timings, so equal runs write equal reports) and
`<out>/timings.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from .args import (DTYPES, all_samples, batches, check_data, check_device, check_out, documents, is_text,
                   load_grouter, say, split)


def _report(out: Path, command: str, heldout: dict, timings: Optional[dict] = None, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(dict(command=command, heldout=heldout, **extra), indent=2))
    (out / "timings.json").write_text(json.dumps(timings or {}, indent=2))


def default_grouter_size(hidden_size: Optional[int]) -> Tuple[int, int, int]:
    """(d_model, n_layers, n_heads) that fit a source of this width: d_model = hidden/4 rounded to a
    multiple of 32, within [64, 512] (the paper's 512 for a 2048-wide source), 3 layers, 64-wide heads."""
    d = 512 if not hidden_size else min(512, max(64, round(hidden_size / 4 / 32) * 32))
    return d, 3, max(1, d // 64)


def _given(value, default):
    return default if value is None else value


def _source_tokenizer(args) -> Optional[str]:
    """The tokenizer of text data: --tokenizer, else the source's own (which must have one)."""
    from ..hf.source import has_tokenizer

    if not is_text(args) or args.tokenizer is not None:
        return None
    if not has_tokenizer(args.source):
        raise ValueError(f"--data {args.data} is text and the source folder {args.source} has no tokenizer; pass "
                         "--tokenizer FOLDER (a local tokenizer or model folder)")
    return args.source


def cmd_distill(args) -> None:
    from ..hf.source import load_source, source_config
    from ..router import Grouter, distill, heldout_metrics, teacher_logits

    device = check_device(args.device)
    out = check_out(args.out)
    config, _ = source_config(args.source, args.layer)  # config.json only: arguments are checked first
    check_data(args)
    docs = documents(args, config.vocab_size, tokenizer=_source_tokenizer(args))
    train, held, unit = split(args, docs)
    t0 = time.perf_counter()
    source, info = load_source(args.source, args.layer, device=device,
                               dtype=DTYPES[args.source_dtype] if args.source_dtype else None)
    load_seconds = time.perf_counter() - t0
    say(f"source: {info['model_type']}, MoE layer {args.layer} in decoder layer {info['decoder_layers_kept'] - 1} "
        f"(read {info['decoder_layers_kept']} of {info['decoder_layers_total']} decoder layers), "
        f"{info['num_experts']} experts, {load_seconds:.1f} s")
    d, n_layers, n_heads = default_grouter_size(info["hidden_size"])
    top_k = _given(args.top_k, info["top_k"] or 2)
    if top_k > info["num_experts"]:
        raise ValueError(f"--top-k {top_k}: the source has {info['num_experts']} experts")
    torch.manual_seed(args.seed)
    g = Grouter(info["vocab_size"], info["num_experts"], top_k, d_model=_given(args.d_model, d),
                n_layers=_given(args.n_layers, n_layers), n_heads=_given(args.n_heads, n_heads),
                causal=not args.bidirectional, source=f"{args.source} (MoE layer {args.layer})").to(device)
    t0 = time.perf_counter()
    teacher = teacher_logits(source, train, args.layer, out / "teacher" / "train", args.batch_size,
                             overwrite=args.overwrite)
    teacher_held = teacher_logits(source, held, args.layer, out / "teacher" / "heldout", args.batch_size,
                                  overwrite=args.overwrite)
    teacher_seconds = time.perf_counter() - t0
    rule = teacher.header["rule"]
    del source
    say(f"teacher: the source's choice of {teacher.top_k} experts ({rule}) for {teacher.count + teacher_held.count} "
        f"samples, {teacher_seconds:.1f} s")
    before = heldout_metrics(g, teacher_held)
    t0 = time.perf_counter()
    history = distill(g, teacher, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    after = heldout_metrics(g, teacher_held)
    g.save(out)
    heldout = dict(samples=int(held.shape[0]), tokens=after["tokens"], unit=unit, k=after["k"],
                   kl_before=before["kl"], kl_after=after["kl"],
                   topk_agreement_before=before["topk_agreement"], topk_agreement=after["topk_agreement"])
    _report(out, "distill", heldout, dict(load_source=load_seconds, teacher=teacher_seconds, distill=seconds),
            steps=len(history), seed=args.seed, train_samples=int(train.shape[0]), grouter=g.config,
            source=dict(model_type=info["model_type"], layer=args.layer, rule=rule, top_k=teacher.top_k,
                        sha256=teacher.header["source_sha256"]),
            loss_first=history[0], loss_last=history[-1])
    print(f"distilled {out}: held-out KL to the source's teacher distribution {before['kl']:.4g} -> {after['kl']:.4g}, "
          f"agreement with the source's top-{after['k']} choice {before['topk_agreement']:.3f} -> "
          f"{after['topk_agreement']:.3f} ({len(history)} steps, {seconds:.1f} s)")


def _grouter_step(args):
    """(the Grouter, the output folder) of fold/expand/tune/predispatch, every argument checked first."""
    check_device(args.device)
    out = check_out(args.out)
    check_data(args)
    return load_grouter(args.grouter, args.device), out


def _check_fewer(g, args) -> None:
    if args.experts > g.num_experts:
        raise ValueError(f"--experts {args.experts}: fold makes fewer experts than the Grouter's {g.num_experts}; "
                         "`grouter expand` makes more")
    if args.top_k is None and args.experts < g.top_k:
        raise ValueError(f"--experts {args.experts} is fewer than the Grouter's top_k {g.top_k}; pass --top-k "
                         f"(at most {args.experts}) to lower it")
    if args.top_k is not None and args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k}: more than --experts {args.experts}")


def cmd_fold(args) -> None:
    from ..nn import fold_groups
    from ..router import affinity, fold, routed_max_vio

    g, out = _grouter_step(args)
    _check_fewer(g, args)
    train, held, unit = split(args, documents(args, g.vocab_size))
    groups = fold_groups(affinity(g, batches(train, args.batch_size)), args.experts, strategy=args.strategy,
                         seed=args.seed)
    folded = fold(g, groups, top_k=args.top_k)
    vio = routed_max_vio(folded, batches(held, args.batch_size))
    folded.save(out)
    _report(out, "fold", dict(samples=int(held.shape[0]), unit=unit, max_vio=vio), groups=groups.tolist(),
            strategy=args.strategy, seed=args.seed, affinity_samples=int(train.shape[0]))
    print(f"folded {g.num_experts} -> {args.experts} experts into {out}; held-out MaxVio {vio:.3f}; "
          f"groups {groups.tolist()}")


def cmd_expand(args) -> None:
    from ..router import expand, routed_max_vio

    g, out = _grouter_step(args)
    if args.experts < g.num_experts:
        raise ValueError(f"--experts {args.experts}: expand makes more experts than the Grouter's {g.num_experts}; "
                         "`grouter fold` makes fewer")
    train, held, unit = split(args, documents(args, g.vocab_size))
    grown = expand(g, args.experts, batches(train, args.batch_size), seed=args.seed)
    vio = routed_max_vio(grown, batches(held, args.batch_size))
    grown.save(out)
    _report(out, "expand", dict(samples=int(held.shape[0]), unit=unit, max_vio=vio), seed=args.seed,
            load_samples=int(train.shape[0]))
    print(f"expanded {g.num_experts} -> {args.experts} experts into {out}; held-out MaxVio {vio:.3f} (tune it next)")


def cmd_tune(args) -> None:
    from ..router import routed_max_vio, tune

    g, out = _grouter_step(args)
    train, held, unit = split(args, documents(args, g.vocab_size))
    # tune keeps its best state by MaxVio: chosen on dev samples taken from the training side, so
    # the held-out figures below are read, never selected on
    if train.shape[0] < 2:
        raise ValueError(f"tune needs at least 2 training samples (tuning and dev), got {train.shape[0]}")
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_dev = max(1, min(held.shape[0], train.shape[0] // 5))
    dev, train = train[order[:n_dev]], train[order[n_dev:]]
    held_before = routed_max_vio(g, batches(held, args.batch_size))
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result = tune(g, batches(train, args.batch_size), method=args.method, steps=args.steps, lr=args.lr,
                  heldout=batches(dev, args.batch_size))
    seconds = time.perf_counter() - t0
    g.save(out)
    heldout = dict(samples=int(held.shape[0]), unit=unit, max_vio_before=held_before,
                   max_vio_after=routed_max_vio(g, batches(held, args.batch_size)))
    selection = dict(split="dev", samples=n_dev, note="samples drawn (--seed) from the training side, left out of "
                     "tuning", max_vio_before=result["max_vio_before"], max_vio_after=result["max_vio_after"],
                     best_step=result["best_step"])
    _report(out, "tune", heldout, dict(tune=seconds), method=args.method, steps=args.steps, seed=args.seed,
            best_step=result["best_step"], selection=selection)
    print(f"tuned {out}: held-out MaxVio {heldout['max_vio_before']:.3f} -> {heldout['max_vio_after']:.3f} "
          f"(state kept from step {result['best_step']} of {args.steps}, chosen on {n_dev} dev samples: "
          f"{result['max_vio_before']:.3f} -> {result['max_vio_after']:.3f})")


def cmd_predispatch(args) -> None:
    from ..router import predispatch

    g, out = _grouter_step(args)
    samples = all_samples(args, documents(args, g.vocab_size))
    t0 = time.perf_counter()
    path = predispatch(g, samples, out, batch_size=args.batch_size)
    _report(out, "predispatch", dict(samples=0, note="every sample is routed; nothing is held out"),
            dict(predispatch=time.perf_counter() - t0), samples=int(samples.shape[0]), seq_len=args.seq_len,
            grouter_checksum=g.checksum())
    print(f"wrote the routes of {samples.shape[0]} samples, with a copy of their tokens, to {path}")


def cmd_export_table(args) -> None:
    from ..router import TableRouter, table_agreement

    check_device(args.device)
    out = Path(args.out)
    if out.is_dir() or (out.exists() and not args.overwrite):
        raise ValueError(f"--out {out}: {'a folder' if out.is_dir() else 'a file'} is in the way (pass --overwrite to "
                         "replace a table)")
    check_data(args)
    g = load_grouter(args.grouter, args.device)
    train, held, unit = split(args, documents(args, g.vocab_size))
    t0 = time.perf_counter()
    table = TableRouter.from_routes(g, [b.to(args.device) for b in batches(train, args.batch_size)],
                                    source=f"{args.grouter} (checksum {g.checksum()[:16]})")
    seconds = time.perf_counter() - t0
    agreement = table_agreement(table, g, [b.to(args.device) for b in batches(held, args.batch_size)])
    table.save(out)
    report = dict(command="export-table", grouter=args.grouter, grouter_checksum=g.checksum(), table=str(out),
                  table_checksum=table.checksum(), vocab_size=table.vocab_size, top_k=table.top_k,
                  num_experts=table.num_experts, train_samples=int(train.shape[0]), seed=args.seed,
                  heldout=dict(samples=int(held.shape[0]), unit=unit, **agreement))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(f"wrote a [{table.vocab_size}, {table.top_k}] table to {out}: on held-out data it gives the Grouter's "
          f"expert set to {agreement['same_set']:.1%} of tokens and {agreement['shared_experts']:.1%} of their "
          f"experts ({seconds:.1f} s; report {out.with_suffix('.json')})")


def cmd_inspect(args) -> None:
    from ..nn import max_vio
    from ..router import PredispatchReader, routing_entropy

    path = Path(args.path)
    if (path / "header.json").is_file():
        reader = PredispatchReader(path)
        reader.verify()
        print(json.dumps(dict(reader.header, verified_samples=len(reader)), indent=2))
        return
    g = load_grouter(args.path)
    info = dict(config=g.config, checksum=g.checksum(), parameters=sum(p.numel() for p in g.parameters()))
    if args.data is not None:
        check_data(args)
        samples = all_samples(args, documents(args, g.vocab_size))
        bs = batches(samples, args.batch_size)
        ids = torch.cat([g.route(b)[0].reshape(-1, g.top_k) for b in bs])
        with torch.no_grad():
            entropy = sum(routing_entropy(g(b)) for b in bs) / len(bs)
        info.update(max_vio=max_vio(ids, g.num_experts), routing_entropy=entropy, tokens=ids.shape[0])
    print(json.dumps(info, indent=2))


def cmd_demo(args) -> None:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, corpus=args.corpus, preset=args.preset, seeds=args.seeds,
             device=args.device, resume=args.resume, jobs=args.jobs)
