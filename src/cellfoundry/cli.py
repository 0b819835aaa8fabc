"""`cellfoundry <command>`: tokenize, build-tokenizer, build-gene-maps, info.

Heavy modules are imported inside each command so ``cellfoundry --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cellfoundry._io import atomic_write_h5ad

DEMO = "demo"


def _add_tokenize(sub) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize .h5ad files of raw counts into an Arrow dataset",
        description="Tokenize .h5ad files (raw counts) into a datasets folder: one shard per "
        f"input. Use '{DEMO}' as input for the shipped demo data (CellTypist sample).",
    )
    p.add_argument("inputs", nargs="+", help="input .h5ad paths or globs, then OUT_DIR")
    p.add_argument("--tokenizer", default="cf-human-v1", help="shipped id, folder or Hub id")
    p.add_argument("--max-length", type=int, default=None, help="tokens per cell incl. <cls>")
    for field in ("species", "assay", "modality"):
        p.add_argument(f"--{field}", default=None, help=f"{field} context value for all cells")
        p.add_argument(f"--{field}-key", default=None, help=f"obs column with the {field}")
    p.add_argument("--keep-obs", default="", help="comma-separated obs columns to keep")
    p.add_argument("--layer", default=None, help="layer with raw counts ('raw' for .raw.X)")
    p.add_argument("--gene-column", default=None, help="var column with gene ids")
    p.add_argument("--gene-species", default="auto", choices=["auto", "human", "mouse"])
    p.add_argument("--allow-normalized", action="store_true", help="accept non-integer values")
    p.add_argument("--num-proc", type=int, default=1, help="input files tokenized in parallel")
    p.add_argument("--num-nodes", type=int, default=1, help="split the file list across nodes")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank")
    p.add_argument("--chunk-size", type=int, default=None, help="cells per chunk (auto)")
    p.add_argument("--backend", default="auto", choices=["auto", "numba", "numpy"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenize)


def _add_build_tokenizer(sub) -> None:
    p = sub.add_parser("build-tokenizer", help="compute gene medians, write tokenizers/<id>/")
    p.add_argument("inputs", nargs="+", help="count .h5ad files or globs")
    p.add_argument("--id", required=True, help="tokenizer id, e.g. cf-human-v1")
    p.add_argument("--out", required=True, help="output folder (tokenizers/<id>)")
    p.add_argument("--min-cells", type=int, default=10)
    p.add_argument("--max-genes", type=int, default=None)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--description", default="")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_build_tokenizer)


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="zero-shot cell embeddings into obsm['X_cellfoundry']")
    p.add_argument("input", help=f".h5ad of raw counts ('{DEMO}' for the shipped demo data)")
    p.add_argument("output", help="output .h5ad (written atomically)")
    p.add_argument("--model", default="cellfoundry-tiny-bert", help="shipped name, folder, Hub id")
    p.add_argument("--pooling", default="cls", choices=["cls", "mean", "max"])
    p.add_argument("--layer", type=int, default=-1, help="hidden layer to pool (-1: last)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per cell incl. <cls>")
    p.add_argument(
        "--max-batch-tokens", type=int, default=16_384, help="cap on cells x longest per batch"
    )
    p.add_argument("--counts-layer", default=None, help="AnnData layer with raw counts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--plot", default=None, help="write a UMAP PNG of the embedding here")
    p.add_argument("--color", default=None, help="obs column for the plot's colours")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="masked-gene pretraining from a YAML config (same options as pretrain_mgm.py)",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="--config ... [--data ...] [k=v ...]")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cellfoundry.training.entry import pretrain_main

    return pretrain_main(args.args)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune for a task from a YAML config (same options as finetune.py)",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="--task ... --config ... [k=v ...]")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("predict", help="apply a fine-tuned task model; write into the .h5ad")
    p.add_argument("input", help=".h5ad with raw counts")
    p.add_argument("output", help="output .h5ad (predictions in obs / obsm)")
    p.add_argument("--model", required=True, help="fine-tuned task model folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--allow-normalized", action="store_true", help="accept non-count input")
    p.add_argument("--score-key", help="obs column of true labels: print scores against it")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)


def _add_perturb(sub) -> None:
    p = sub.add_parser(
        "perturb",
        help="in-silico perturbation: delete or overexpress genes in each cell's rank tokens",
    )
    p.add_argument("input", help=".h5ad with raw counts")
    p.add_argument("output_dir", help="run folder (resumable): genes.tsv, cells.tsv.gz, ...")
    p.add_argument("--genes", nargs="+", required=True, help="symbols or Ensembl ids")
    p.add_argument("--mode", choices=["delete", "overexpress"], default="delete")
    p.add_argument("--model", default="cellfoundry-tiny-bert")
    p.add_argument(
        "--target",
        nargs=3,
        metavar=("OBS_KEY", "SOURCE", "TARGET"),
        help="perturb the SOURCE cells and score moves toward the TARGET cells' state",
    )
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-normalized", action="store_true", help="accept non-count input")
    p.add_argument("--overwrite", action="store_true", help="start the folder's run again")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_perturb)


def cmd_perturb(args: argparse.Namespace) -> int:
    from cellfoundry.in_silico import TargetState, in_silico_perturbation

    source = Path(args.input)
    if not source.exists():
        raise ValueError(f"Input file {source} does not exist; check the path.")
    result = in_silico_perturbation(
        source,
        args.genes,
        args.output_dir,
        model=args.model,
        mode=args.mode,
        target=TargetState(*args.target) if args.target else None,
        max_cells=args.max_cells,
        batch_size=args.batch_size,
        pooling=args.pooling,
        max_length=args.max_length,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        allow_normalized=args.allow_normalized,
    )
    columns = ["gene", "n_cells", "cell_shift_mean", "target_shift_mean"]
    print(result.genes[columns].to_string(index=False))
    print(f"wrote {args.output_dir}/genes.tsv, cells.tsv.gz and affected.tsv")
    return 0


def _add_grn(sub) -> None:
    from cellfoundry.grn import METHODS  # names only: the methods load on use

    p = sub.add_parser("grn", help="infer a ranked TF -> target edge table (TSV)")
    p.add_argument("input", help=".h5ad with raw counts (gene symbols in var_names)")
    p.add_argument("output", help="edge table .tsv: tf, target, score, rank")
    p.add_argument("--method", choices=METHODS, default="attention")
    p.add_argument("--tfs", required=True, help="TF list, one symbol per line (e.g. Lambert 2018)")
    p.add_argument("--n-genes", type=int, default=1000, help="most variable genes (+ their TFs)")
    p.add_argument("--model", default="cellfoundry-tiny-bert")
    p.add_argument("--max-cells", type=int, default=None, help="seeded subsample of cells")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gold", help="gold-standard CSV (tf,target[,confidence]): print scores")
    p.add_argument("--confidence", default=None, help="gold confidence levels kept, e.g. ABC")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_grn)


def cmd_grn(args: argparse.Namespace) -> int:
    import anndata as ad

    from cellfoundry.evaluation.grn import gold_standard, grn_scores, read_edges, read_tf_list
    from cellfoundry.grn import MODEL_METHODS, gene_universe, infer_edges, write_edges

    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise ValueError(f"Input file {source} does not exist; check the path.")
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it.")
    adata = ad.read_h5ad(source)
    tfs = read_tf_list(args.tfs)
    universe = gene_universe(adata, tfs, n_genes=args.n_genes)
    options: dict = {}
    if args.method in MODEL_METHODS:
        options = {"model": args.model, "batch_size": args.batch_size, "device": args.device}
    if args.method in MODEL_METHODS + ("genie3",) and args.max_cells is not None:
        options["max_cells"] = args.max_cells
    edges = infer_edges(adata, universe, args.method, seed=args.seed, **options)
    write_edges(edges, output)
    print(f"{len(universe.genes)} genes, {len(universe.tfs)} TFs: {len(edges)} edges -> {output}")
    if args.gold:
        gold = gold_standard(read_edges(args.gold, args.confidence), universe.genes, tfs)
        scores = grn_scores(edges, gold)
        print(
            f"vs {args.gold}: EPR {scores.epr:.3f}, AUPRC ratio {scores.auprc_ratio:.3f}, "
            f"AUROC {scores.auroc:.3f} ({scores.n_tfs} TFs, {scores.n_true} true edges)"
        )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from cellfoundry.tasks.entry import finetune_main

    return finetune_main(args.args)


def cmd_predict(args: argparse.Namespace) -> int:
    import anndata as ad

    from cellfoundry.tasks import load_task_model, predict

    source, output = Path(args.input), Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; choose another path or pass --overwrite.")
    if not source.exists():
        raise ValueError(f"Input file {source} does not exist; check the path.")
    model = load_task_model(args.model, args.device)
    adata = ad.read_h5ad(source)
    start = time.perf_counter()
    written = predict(
        adata,
        model,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        score_key=args.score_key,
        allow_normalized=args.allow_normalized,
    )
    atomic_write_h5ad(adata, output)
    seconds = time.perf_counter() - start
    scores = written.pop("scores", None)
    print(
        f"{model.config.task}: {adata.n_obs} cells -> {output} ({', '.join(written)}), "
        f"{seconds:.2f} s"
    )
    if scores is not None:
        print(
            f"scores against obs[{args.score_key!r}]:", {k: round(v, 4) for k, v in scores.items()}
        )
    return 0


def _add_misc(sub) -> None:
    p = sub.add_parser("build-gene-maps", help="rebuild the shipped gene maps from CSV sources")
    p.add_argument("source", help="folder with human_gencode_v44_ensembl_symbol.csv etc.")
    p.add_argument("--out", default=None, help="output folder (default: the package's)")
    p.set_defaults(func=cmd_build_gene_maps)
    p = sub.add_parser("info", help="versions, shipped tokenizers and models")
    p.set_defaults(func=cmd_info)


def _add_bench(sub) -> None:
    from cellfoundry.bench.suite import add_arguments, run_from_arguments

    p = sub.add_parser(
        "bench", help="run the benchmark suite against its baselines; write SUMMARY.md"
    )
    add_arguments(p)
    p.set_defaults(func=run_from_arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellfoundry", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenize(sub)
    _add_build_tokenizer(sub)
    _add_embed(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_perturb(sub)
    _add_grn(sub)
    _add_bench(sub)
    _add_misc(sub)
    return parser


def cmd_tokenize(args: argparse.Namespace) -> int:
    from cellfoundry import demo_path
    from cellfoundry.tokenization import ContextSpec, TokenizeOptions, load_tokenizer
    from cellfoundry.tokenization.pipeline import tokenize_files

    if len(args.inputs) < 2:
        raise ValueError("Give at least one input and the output folder: tokenize IN... OUT_DIR")
    *inputs, out_dir = args.inputs
    inputs = [str(demo_path()) if item == DEMO else item for item in inputs]
    context = ContextSpec(
        args.species,
        args.assay,
        args.modality,
        args.species_key,
        args.assay_key,
        args.modality_key,
    )
    keep = tuple(c for c in args.keep_obs.split(",") if c)
    options = TokenizeOptions(
        args.max_length,
        context,
        keep,
        args.layer,
        args.allow_normalized,
        args.gene_column,
        args.gene_species,
        args.chunk_size,
        args.backend,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    reports = tokenize_files(
        inputs,
        out_dir,
        tokenizer,
        options,
        args.num_proc,
        args.num_nodes,
        args.node_rank,
        args.overwrite,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    _print_tokenize_summary(reports, out_dir, tokenizer.name, seconds)
    return 0


def _print_tokenize_summary(reports, out_dir, tokenizer_name: str, seconds: float) -> None:
    cells_in = sum(r.n_cells_in for r in reports)
    cells_out = sum(r.n_cells_out for r in reports)
    tokens = sum(r.n_tokens for r in reports)
    print(f"tokenized with {tokenizer_name} -> {out_dir}")
    for r in reports:
        genes = r.genes
        print(
            f"  {Path(r.input).name}: {r.n_cells_out}/{r.n_cells_in} cells kept "
            f"({r.n_empty_dropped} empty, {r.n_no_vocab_gene_dropped} without vocab genes), "
            f"genes mapped {genes.get('n_mapped', '?')}/{genes.get('n_input', '?')} "
            f"(unmapped {genes.get('n_unmapped', '?')}, collapsed {genes.get('n_collapsed', '?')},"
            f" in vocab {r.n_genes_in_vocab}), {r.tokens_per_cell:.0f} tokens/cell"
        )
    print(
        f"total: {cells_out} cells, {tokens / max(cells_out, 1):.0f} tokens/cell, "
        f"{seconds:.2f} s, {cells_in / max(seconds, 1e-9):,.0f} cells/s"
    )


def cmd_embed(args: argparse.Namespace) -> int:

    import anndata as ad

    from cellfoundry import demo_path
    from cellfoundry.embedding import OBSM_KEY, embed

    source = demo_path() if args.input == DEMO else Path(args.input)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; choose another path or pass --overwrite.")
    if not source.exists():
        raise ValueError(f"Input file {source} does not exist; check the path.")
    adata = ad.read_h5ad(source)
    if args.plot:
        from cellfoundry.plotting import pick_color_column

        color = pick_color_column(adata.obs, args.color)  # fail before the slow part
    start = time.perf_counter()
    vectors = embed(
        adata,
        args.model,
        args.pooling,
        args.layer,
        args.batch_size,
        args.max_length,
        args.max_batch_tokens,
        counts_layer=args.counts_layer,
        device=args.device,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    atomic_write_h5ad(adata, output)
    print(
        f"embedded {vectors.shape[0]} cells -> {output} obsm['{OBSM_KEY}'] {vectors.shape}, "
        f"{seconds:.2f} s, {vectors.shape[0] / max(seconds, 1e-9):,.0f} cells/s"
    )
    if args.plot:
        from cellfoundry.plotting import umap_plot

        labels = adata.obs[color] if color else None
        umap_plot(vectors, labels, args.plot, f"{args.model} ({args.pooling}) by {color}")
        print(f"UMAP coloured by {color}: {args.plot}")
    return 0


def cmd_build_tokenizer(args: argparse.Namespace) -> int:
    from cellfoundry.tokenization.build import build_tokenizer
    from cellfoundry.tokenization.pipeline import expand_inputs

    command = "cellfoundry build-tokenizer " + " ".join(sys.argv[2:])
    tokenizer = build_tokenizer(
        expand_inputs(args.inputs),
        args.out,
        args.id,
        args.min_cells,
        args.max_genes,
        args.max_length,
        description=args.description,
        overwrite=args.overwrite,
        command=command,
    )
    print(f"wrote {args.out}: {len(tokenizer.vocab)} tokens, sha256 {tokenizer.vocab.sha256}")
    return 0


def cmd_build_gene_maps(args: argparse.Namespace) -> int:
    from cellfoundry.genes import build_gene_maps

    provenance = build_gene_maps(args.source, args.out)
    print(f"wrote gene maps: {list(provenance.get('outputs', provenance))}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    import cellfoundry
    from cellfoundry.tokenization.registry import shipped_tokenizers

    print(f"cellfoundry {cellfoundry.__version__} (Python {platform.python_version()})")
    for package in (
        "numpy",
        "scipy",
        "anndata",
        "datasets",
        "numba",
        "torch",
        "transformers",
        "peft",
        "accelerate",
    ):
        try:
            print(f"  {package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            print(f"  {package} not installed")
    print("shipped tokenizers:")
    for name, path in shipped_tokenizers().items():
        print(f"  {name}: {path}")
    from cellfoundry.hub import shipped_models

    models = sorted(shipped_models())
    print("shipped models: " + (", ".join(models) if models else "none yet"))
    print(f"demo data: {cellfoundry.demo_path()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:  # options belong to pretrain_main's own parser
        return cmd_pretrain(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
