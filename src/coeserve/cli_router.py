"""`coe router train | eval | map`, `coe route` and `coe evaluate`: the bodies of the routing commands,
registered on the main parser by `add_parsers`. Failures the user can cause raise the errors that cli.py
prints as one line."""
from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_DATA = Path("data/routing/routing.jsonl")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _pairs(text: str | None, what: str) -> dict[str, str]:
    out = {}
    for part in _csv(text or ""):
        if "=" not in part:
            raise ValueError(f"{what}: expected NAME=VALUE pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _router_path(args) -> Path:
    from coeserve.router.router import BUILTIN
    return Path(args.router) if args.router else BUILTIN


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(*columns, title=title)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(width=160).print(t)


def cmd_router_train(args) -> None:
    from coeserve.router import data
    from coeserve.router.router import Router, read_spec, write_spec
    from coeserve.router.train import TrainConfig, evaluate, train

    cfg = TrainConfig(classifiers=_csv(args.classifiers), target_accuracy=args.target_accuracy,
                      embedder=args.embedder, max_seq_length=args.max_seq_length)
    out = Path(args.out)
    old = read_spec(out) if (out / "router.json").is_file() else None
    res = train(Path(args.data), out, cfg, device=args.device)
    _table("classifiers (validation split; µs: classifier alone, batch 64)",
           ["classifier", "val accuracy", "µs/prompt", "fit s"],
           [[r["classifier"], f"{r['val_accuracy']:.4f}", r["us_per_prompt"], r["fit_s"]] for r in res["comparison"]])
    router = Router.load(out, device=args.device)
    if old and old.mapping:  # retraining keeps the category→expert table the optimiser chose
        from dataclasses import replace
        kept = {c: e for c, e in old.mapping.items() if c in router.spec.categories}
        write_spec(out, replace(router.spec, mapping=kept))
    test = [r for r in data.load(Path(args.data)) if r.get("split") == "test"]
    summary = {**res, "out": str(out)}
    if test:
        ev = evaluate(router, test)
        summary["test"] = {k: ev[k] for k in ("n", "classifier_accuracy", "routed_accuracy", "fallback_rate")}
    print(f"chose {res['chosen']}; fallback below p={res['threshold']:.4f}, nearest-prompt cosine "
          f"{res['ood_threshold']:.4f} or wordiness {res['text_threshold']:.4f}; wrote {out}")
    print(json.dumps(summary))


def cmd_router_eval(args) -> None:
    from coeserve.router import data
    from coeserve.router.router import Router
    from coeserve.router.train import evaluate, plot_confusion

    rows = data.load(Path(args.data), None if args.split == "all" else args.split)
    ev = evaluate(Router.load(_router_path(args), device=args.device), rows)
    _table(f"{len(rows)} prompts ({args.split} split)", ["category", "n", "precision", "recall"],
           [[c, p["n"], p["precision"], p["recall"]] for c, p in ev["per_category"].items()])
    print(f"classifier accuracy {ev['classifier_accuracy']:.4f}  routed accuracy {ev['routed_accuracy']:.4f}  "
          f"fallback rate {ev['fallback_rate']:.4f}")
    if args.confusion:
        plot_confusion(ev, Path(args.confusion), f"router on {Path(args.data).name} ({args.split})")
        print(f"confusion matrix: {args.confusion}")
    print(json.dumps({k: v for k, v in ev.items() if k != "per_category"} if not args.json else ev))


def cmd_route(args) -> None:
    from coeserve.router.router import Router

    router = Router.load(_router_path(args), device=args.device)
    router.route(["warm-up"])  # the first call pays one-time setup; report steady-state routing time
    t = time.perf_counter()
    r = router.route([args.prompt])[0]
    ms = (time.perf_counter() - t) * 1e3
    if args.json:
        print(json.dumps({"category": r.category, "prob": round(r.prob, 4), "predicted": r.predicted,
                          "reason": r.reason, "expert": r.expert, "route_ms": round(ms, 2)}))
        return
    print(f"category: {r.category}  (p={r.prob:.3f}, {r.reason}" +
          (f"; classifier said {r.predicted})" if r.category != r.predicted else ")"))
    print(f"expert:   {r.expert or '(none: the router has no mapping for this category)'}")
    print(f"routing:  {ms:.1f} ms on {router.embedder.device.type}")


def _grouped(mapping: dict) -> str:
    by: dict[str, list[str]] = {}
    for c, e in mapping.items():
        by.setdefault(e, []).append(c)
    return "; ".join(f"{e}: {', '.join(cs)}" for e, cs in by.items())


def _print_tables(problem, chosen, front) -> None:
    cats = list(problem.categories)
    if front:
        _table("Pareto frontier: expected score vs average active parameters", ["avg params", "score", "table"],
               [[f"{a.avg_params / 1e6:.1f}M", f"{a.score:.4f}", _grouped(a.mapping)] for a in front])
    if chosen is not None:
        _table("chosen table", ["category", "expert", "frequency"],
               [[c, chosen.mapping[c], f"{problem.freq[j]:.3f}"] for j, c in enumerate(cats)])


def cmd_router_map(args) -> None:
    from dataclasses import replace

    from coeserve.router.mapping import from_scores, parse_count, pareto, plot_pareto, solve
    from coeserve.router.router import read_spec, write_spec

    if not args.budget and not args.pareto:
        raise ValueError("give --budget (e.g. 200M), --pareto, or both")
    path = _router_path(args)
    spec = read_spec(path)
    scores = Path(args.scores)
    if not scores.is_file():
        raise FileNotFoundError(f"{scores}: no such file")
    problem = from_scores(json.loads(scores.read_text(encoding="utf-8")), spec.categories,
                          {k: float(v) for k, v in _pairs(args.freq, "--freq").items()},
                          _pairs(args.params, "--params"), _pairs(args.assign, "--assign"))
    budget = parse_count(args.budget) if args.budget else None
    chosen = solve(problem, budget) if budget is not None else None
    front = pareto(problem) if args.pareto else []
    _print_tables(problem, chosen, front)
    if front:
        plot_pareto(front, Path(args.plot), chosen, budget)
        print(f"frontier plot: {args.plot}")
    result = {"frontier": [{"avg_params": a.avg_params, "score": a.score, "mapping": a.mapping} for a in front]}
    if chosen is not None:
        result.update(budget=budget, mapping=chosen.mapping, score=round(chosen.score, 6),
                      avg_params=round(chosen.avg_params))
        if not args.dry_run:
            write_spec(path, replace(spec, mapping=chosen.mapping))
            result["wrote"] = str(path)
            print(f"expected score {chosen.score:.4f} at {chosen.avg_params / 1e6:.1f}M average active "
                  f"parameters (budget {budget / 1e6:.1f}M); wrote the table into {path}")
    print(json.dumps(result))


def cmd_evaluate(args) -> None:
    from coeserve.config import default_home
    from coeserve.evaluate.judge import EndpointJudge, ExpertJudge
    from coeserve.evaluate.run import EvalConfig, plot_heatmap, run
    from coeserve.evaluate.generate import Generators
    from coeserve.store.disk import DiskStore

    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together")
    judge_name = args.judge or (f"{args.judge_model}@{args.judge_url}" if args.judge_url else "")
    cfg = EvalConfig(_csv(args.experts), _csv(args.categories), args.per_category, args.max_tokens,
                     Path(args.data).name, judge_name)
    store = DiskStore(args.home or default_home())
    for e in cfg.experts + ((args.judge,) if args.judge else ()):
        store.info(e)  # fail now, not an hour in, if an expert is not installed
    gens = Generators(store, args.device, args.max_seq_len)

    def judge_for():
        if args.judge_url:
            return EndpointJudge(args.judge_url, args.judge_model)
        if not args.judge:
            raise ValueError("these categories are graded by a judge: give --judge EXPERT or --judge-url/--judge-model")
        from coeserve.evaluate.judge import PREFIX
        return ExpertJudge(args.judge, gens.get(args.judge, keep=True, prefix=PREFIX))

    out = Path(args.out)
    prog, update = _progress_bar("evaluating")
    with prog:
        doc = run(cfg, Path(args.data), out, gens.get, judge_for, lambda e: store.info(e).params, update)
    heatmap = Path(args.heatmap) if args.heatmap else out.with_suffix(".png")
    plot_heatmap(doc, heatmap)
    cats = list(doc["categories"])
    _table(f"score per expert and category ({cfg.per_category} items per cell)", ["expert", *cats],
           [[e, *[f"{doc['cells'][f'{e}/{c}']['score']:.2f}" if f"{e}/{c}" in doc["cells"] else "–" for c in cats]]
            for e in doc["experts"]])
    print(f"score matrix: {out}; heatmap: {heatmap}")
    print(json.dumps({"scores": {k: v["score"] for k, v in doc["cells"].items()}, "out": str(out)}))


def _progress_bar(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeElapsedColumn())
    task = prog.add_task("", total=None)
    return prog, (lambda done, total, what: prog.update(task, completed=done, total=total, description=what))


def add_parsers(sub) -> None:
    _add_router(sub)
    _add_route_and_evaluate(sub)


def _add_router(sub) -> None:
    r = sub.add_parser("router", help="train, evaluate and map the category router")
    rs = r.add_subparsers(dest="router_cmd", required=True)
    s = rs.add_parser("train", help="train a router on a labelled JSONL routing set")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--classifiers", default="logreg,mlp,knn")
    s.add_argument("--target-accuracy", type=float, default=0.98,
                   help="accuracy required of non-fallback validation prompts (calibrates the threshold)")
    s.add_argument("--embedder", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 or a sentence-transformers dir")
    s.add_argument("--max-seq-length", type=int, default=64, help="embedder input tokens per prompt")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_router_train)

    s = rs.add_parser("eval", help="accuracy, per-category precision/recall, confusion matrix, fallback rate")
    s.add_argument("--data", required=True)
    s.add_argument("--router", help="router directory (default: the built-in router)")
    s.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    s.add_argument("--confusion", default="router-confusion.png", help="where to save the confusion matrix PNG")
    s.add_argument("--json", action="store_true", help="include per-category numbers in the JSON line")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_router_eval)

    s = rs.add_parser("map", help="choose the category→expert table under a parameter budget")
    s.add_argument("--scores", required=True, help="score matrix JSON from `coe evaluate`")
    s.add_argument("--budget", help="average active parameters per request, e.g. 200M")
    s.add_argument("--router", help="router directory to write the table into (default: the built-in router)")
    s.add_argument("--freq", help="category frequencies, e.g. math=0.3,coding=0.2 (default: uniform)")
    s.add_argument("--params", help="active parameters per expert, e.g. big=7B (default: from the score file)")
    s.add_argument("--assign", help="pin categories, e.g. general=smollm2-135m-instruct")
    s.add_argument("--pareto", action="store_true", help="print the whole score/parameters frontier")
    s.add_argument("--plot", default="pareto.png", help="with --pareto: where to save the frontier PNG")
    s.add_argument("--dry-run", action="store_true", help="print the table, do not write it")
    s.set_defaults(fn=cmd_router_map)


def _add_route_and_evaluate(sub) -> None:
    s = sub.add_parser("route", help="route one prompt: category, probability, expert, routing time")
    s.add_argument("prompt")
    s.add_argument("--router", help="router directory (default: the built-in router)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_route)

    s = sub.add_parser("evaluate", help="score experts per category: the matrix the mapping optimises")
    s.add_argument("--experts", required=True, help="comma-separated installed experts")
    s.add_argument("--categories", default="math,coding,stem")
    s.add_argument("--per-category", type=int, default=10)
    s.add_argument("--data", default=str(DEFAULT_DATA), help="routing set; items come from its test split")
    s.add_argument("--out", default="scores.json")
    s.add_argument("--heatmap", default=None, help="PNG path (default: beside --out)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--judge", help="installed expert that grades open-ended categories")
    s.add_argument("--judge-url", help="OpenAI-compatible base URL of the judge (with --judge-model)")
    s.add_argument("--judge-model")
    s.add_argument("--max-seq-len", type=int, default=2048)
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_evaluate)
