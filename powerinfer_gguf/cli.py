"""Console commands. Thin: parse, call one module, print. Errors are one line, exit status 1."""
from __future__ import annotations

import functools
import json
import sys

import click


def one_line_errors(fn):
    """Known failures (bad input, missing build, failed tool) become one clear line, no traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from .build import BuildError

        try:
            return fn(*a, **kw)
        except (ValueError, FileNotFoundError, RuntimeError, BuildError, OSError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise click.ClickException(msg) from None

    return wrapper


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-j", "--jobs", type=int, default=None, help="build jobs (default: all cores)")
@click.option("--no-python", is_flag=True, help="build only; leave the Python environment alone")
def setup_cmd(jobs, no_python):
    """Fetch the pinned llama-cpp-python sdist, apply patches/, build patched + stock (cached)."""
    from .build import main

    sys.exit(main(["setup"] + (["-j", str(jobs)] if jobs else []) + (["--no-python"] if no_python else [])))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--preset", default="tiny", show_default=True,
              help="model shape: tiny, small, 1b, 3b, 7b, 13b, 40b, 70b")
@click.option("--outtype", default="f16", show_default=True, type=click.Choice(["f32", "f16", "q4_0", "q8_0"]))
@click.option("--act", default="relu", show_default=True, type=click.Choice(["relu", "drelu"]))
@click.option("--firing", default=0.10, show_default=True, help="mean firing rate of FFN neurons")
@click.option("--hot-share", default=0.25, show_default=True, help="share of neurons (hottest first) ...")
@click.option("--hot-mass", default=0.80, show_default=True, help="... that give this share of activations")
@click.option("--seed", default=0, show_default=True)
@click.option("--layers", type=int, default=None, help="override the preset's layer count")
@click.option("--hf", "hf_dir", type=click.Path(file_okay=False), default=None,
              help="also write the same weights as an HF checkpoint folder (sharded per layer)")
@click.option("--calib-tokens", type=int, default=None, help="tokens that set the firing biases")
@click.option("--heldout-tokens", type=int, default=None, help="tokens that measure the result")
@click.option("--pi", "pi_out", type=click.Path(dir_okay=False), default=None,
              help="also write our sparse layout of the same weights (ranked rows, predictors from the "
                   "generator's low-rank gate): OUTPUT is then its stock twin")
@click.option("--force", is_flag=True,
              help="replace existing outputs (an --hf folder only if it holds nothing but a previous --hf output)")
@one_line_errors
def synth_cmd(output, preset, outtype, act, firing, hot_share, hot_mass, seed, layers, hf_dir,
              calib_tokens, heldout_tokens, pi_out, force):
    """Write a synthetic power-law ReLU LLaMA model (GGUF) that really fires as asked."""
    from dataclasses import replace

    from .outputs import sigterm_interrupts
    from .synth import FiringTarget, hparams_for, synthesize

    hp = hparams_for(preset, act)
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        hp = replace(hp, n_layer=layers)
    with sigterm_interrupts():
        res = synthesize(output, preset, outtype=outtype, act=act, seed=seed,
                         target=FiringTarget(firing, hot_share, hot_mass), hparams=hp if layers else None,
                         hf_dir=hf_dir, calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, pi_out=pi_out,
                         force=force)
    click.echo(res.profile.table())
    click.echo(f"wrote {res.path} ({res.bytes / 2**30:.2f} GiB, {outtype}) in {res.seconds:.1f} s"
               + (f"; HF checkpoint in {hf_dir}" if hf_dir else "")
               + (f"; our sparse layout in {pi_out}" if pi_out else ""))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--stock", "stock_model", default=None,
              help="the stock twin of MODEL (pi-convert --stock) for the stock column")
@click.option("--vram-budget", default="0", show_default=True,
              help="GPU memory to use: 0, 8GiB, 10GB, 40% (of the weights) or auto")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
@click.option("-p", "n_prompt", type=int, default=64, show_default=True, help="prompt tokens")
@click.option("-n", "n_gen", type=int, default=128, show_default=True, help="generated tokens")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True)
@click.option("--json", "json_path", default=None, help="write the result as JSON")
@click.option("--plot", "plot_path", default=None, help="write a bar chart (PNG)")
@click.option("--force", is_flag=True, help="replace an existing --json or --plot file")
@click.option("--sweep", default=None,
              help="comma-separated budgets (e.g. 0,10%,20%,40%,70%,100%): one run each, a table and "
                   "(--plot) decode speed against the budget")
@click.option("--ttft", default=None, metavar="SIZES",
              help="prompt sizes in tokens (e.g. 512,2048) to time the first token at on both sides, or none. "
                   "Default: 512,2048 at a budget above 0 (a GPU at work), none at budget 0 (on a CPU alone a "
                   "2048-token prompt of a 13B model takes minutes per run); in a sweep, per budget. TTFT = "
                   "prompt tokens / prompt t/s at that size. The plans on both sides keep the KV cache of the "
                   "longest run")
@click.option("--profile", is_flag=True,
              help="instead: decode -n tokens with ours through the Python API and show where a token's time "
                   "goes (CPU sparse FFN per layer, its GB/s and threads, the rest)")
@click.option("--serve", "serve_streams", default=None, metavar="COUNTS",
              help="instead: serve COUNTS streams at once (e.g. 1,4,8), ours (pi-serve --parallel's llama-server) "
                   "against stock llama-server on the --stock twin: aggregate t/s, ms/token a stream, TTFT")
@one_line_errors
def bench_cmd(model, stock_model, vram_budget, threads, n_prompt, n_gen, repetitions, json_path, plot_path, force,
              sweep, ttft, profile, serve_streams):
    """Prompt and decode tokens/s, ours against stock llama.cpp at one VRAM budget, side by side.

    MODEL is our file (pi-convert) with --stock its twin, or a plain GGUF for stock alone. On a
    GPU, stock runs both of its ways to use a small GPU (-ngl layer offload, -ot attention on the
    GPU and FFN on the CPU) and each measure (prompts, decode, time to first token) compares ours
    with the way faster at it."""
    if profile and (stock_model or sweep or plot_path or ttft):
        raise click.UsageError("--profile runs ours alone at one budget: no --stock, --sweep, --plot or --ttft")
    if serve_streams and (profile or sweep or plot_path or ttft):
        raise click.UsageError("--serve runs at one budget: no --profile, --sweep, --plot or --ttft")
    # libllama before numpy (bench imports it; --profile and the plan of ours at a budget load
    # libllama): in the GPU machine's Python (numpy 2.5) numpy first and then libggml's load
    # segfaults (seen 2026-12-01 with --profile, 2026-12-03 planning at a budget)
    from . import Llama
    Llama  # noqa: B018  (resolved lazily: force the load now)
    from . import bench

    ttft_sizes = bench.parse_ttft(ttft)
    _check_bench_outputs(json_path, plot_path, [model, stock_model], force)
    if serve_streams:
        _bench_serve(model, stock_model, vram_budget, threads, serve_streams, n_prompt, n_gen, repetitions, json_path)
        return
    if profile:
        prof = bench.profile_decode(model, vram_budget, threads, n_prompt, n_gen)
        click.echo(prof.render())
        if json_path:
            bench.write_json(prof, json_path)
        return
    if sweep:
        _bench_sweep(model, stock_model, sweep, threads, n_prompt, n_gen, repetitions, ttft_sizes, json_path,
                     plot_path)
        return
    res = bench.run_bench(model, stock_model, vram_budget, threads, n_prompt, n_gen, repetitions, ttft_sizes,
                          progress=lambda m: click.echo(m, err=True))
    click.echo(bench.render_table(res))
    if json_path:
        bench.write_json(res, json_path)
    if plot_path:
        bench.render_plot(res, plot_path)


def _check_bench_outputs(json_path, plot_path, inputs, force: bool) -> None:
    """Before any run: each output can be written (an existing one only with --force, never an
    input), and the two are not one file: a whole run's result would otherwise be lost at its end."""
    from .outputs import check_outputs

    check_outputs([json_path, plot_path], [i for i in inputs if i], force=force)


def _bench_serve(model, stock_model, vram_budget, threads, streams, n_prompt, n_gen, repetitions, json_path) -> None:
    from .bench import write_json
    from .bench.serve import run_serve_bench

    try:
        counts = [int(k) for k in streams.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--serve {streams!r}: give stream counts such as 1,4,8") from None
    res = run_serve_bench(model, stock_model, vram_budget, threads, counts, n_prompt, n_gen, repetitions,
                          progress=lambda m: click.echo(m, err=True))
    click.echo(res.render())
    if json_path:
        write_json(res, json_path)


def _bench_sweep(model, stock_model, sweep, threads, n_prompt, n_gen, repetitions, ttft, json_path,
                 plot_path) -> None:
    from . import bench

    results = bench.run_sweep(model, stock_model, [b for b in sweep.split(",") if b.strip()],
                              threads=threads, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, ttft=ttft,
                              progress=lambda m: click.echo(m, err=True))
    for r in results:
        click.echo(bench.render_table(r) + "\n")
    click.echo(bench.render_sweep_table(results))
    if json_path:
        bench.write_sweep_json(results, json_path)
    if plot_path:
        bench.render_sweep_plot(results, plot_path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="output GGUF")
@click.option("--calib", type=click.Path(dir_okay=False, exists=True), default=None,
              help="calibration text file (default: Python's own documentation prose)")
@click.option("--calib-tokens", type=int, default=2048, show_default=True, help="tokens to profile")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True)
@click.option("--predictor-rank", type=int, default=None, help="fix the predictor rank (default: chosen per layer)")
@click.option("--predictor-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="import PowerInfer's predictors (model_N.pt) instead of fitting them")
@click.option("--recall", type=float, default=0.99, show_default=True, help="predictor recall target")
@click.option("--predictor-steps", type=int, default=0, show_default=True,
              help="also train a ReLU-MLP predictor this many Adam steps (kept where it reads fewer bytes)")
@click.option("--act", type=click.Choice(["relu", "drelu", "silu"]), default=None,
              help="override config.json's hidden_act (e.g. drelu for TurboSparse checkpoints)")
@click.option("--stock", type=click.Path(dir_okay=False), default=None,
              help="also write a stock llama.cpp GGUF of the same (permuted) weights")
@click.option("--force", is_flag=True, help="replace existing output files")
@one_line_errors
def convert_cmd(hf_dir, output, calib, calib_tokens, outtype, predictor_rank, predictor_dir, recall,
                predictor_steps, act, stock, force):
    """Convert an HF checkpoint into a GGUF with activation profile, predictors and metadata."""
    from .convert import convert
    from .outputs import sigterm_interrupts

    with sigterm_interrupts():
        rep = convert(hf_dir, output, calib=calib, calib_tokens=calib_tokens, outtype=outtype,
                      predictor_rank=predictor_rank, predictor_dir=predictor_dir, stock=stock, recall=recall,
                      act=act, predictor_steps=predictor_steps, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(rep.summary())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--vram-budget", default="0", show_default=True,
              help="GPU memory for the model: 8GiB, 40% (of the weights), auto, or 0 (CPU only)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--n-ctx", type=int, default=2048, show_default=True, help="context length (the KV reserve is sized for it)")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
@click.option("--parallel", type=int, default=None, metavar="N",
              help="N slots decoded together (the patched llama-server), each of --n-ctx tokens")
@one_line_errors
def serve_cmd(model, vram_budget, host, port, n_ctx, threads, parallel):
    """Serve MODEL (ours or a plain GGUF) with the OpenAI API (llama-cpp-python's server app).

    Concurrent requests queue and each completes (llama-cpp-python's default would end a stream
    as soon as another request waits). With --parallel N, the patched llama-server decodes N
    requests together. Logs the mode and the placement at start."""
    from .serve import serve
    serve(model, vram_budget, host, port, n_ctx, threads, log=lambda m: click.echo(m, err=True), parallel=parallel)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--int4", is_flag=True, help="4-bit rows: Q4_0 (the same as --type q4_0)")
@click.option("--type", "qtype", default=None, metavar="q4_0|q8_0|q4_k",
              help="q4_0, q8_0, or q4_k (llama.cpp's Q4_K_M mix)")
@click.option("--predictor-type", default="auto", show_default=True, metavar="auto|q8_0|f16",
              help="our predictors' precision; auto: q8_0 where rows divide into its blocks, else f16")
@click.option("-t", "--threads", type=int, default=None, help="quantizer threads (default: all cores)")
@click.option("--force", is_flag=True, help="replace an existing OUT")
@one_line_errors
def quantize_cmd(src, out, int4, qtype, predictor_type, threads, force):
    """Quantize SRC (ours or a stock twin, F32/F16/BF16) to OUT with llama.cpp's quantizer,
    keeping our keys, layout and predictors."""
    from .outputs import sigterm_interrupts
    from .quantize import quantize

    if int4 and qtype not in (None, "q4_0"):
        raise ValueError("--int4 is q4_0: give --int4 or --type, not both")
    if not int4 and qtype is None:
        raise ValueError("give --int4 or --type q4_0|q8_0|q4_k")
    with sigterm_interrupts():
        res = quantize(src, out, "q4_0" if int4 else qtype, predictor_type=predictor_type, threads=threads, force=force)
    click.echo(res.summary())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--stock", default=None, help="its stock twin: the same weights' perplexity run as stock")
@click.option("--text", "text_file", default=None,
              help="evaluation text (default: /usr/share/common-licenses, else llama.cpp's docs)")
@click.option("--tokens", "n_tokens", type=int, default=2048, show_default=True, help="tokens scored")
@click.option("--ctx", "n_ctx", type=int, default=256, show_default=True, help="window length")
@click.option("--recall-tokens", type=int, default=512, show_default=True,
              help="tokens of the numpy forward pass that measures recall and precision (0: skip)")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
@click.option("--json", "json_path", default=None, help="also write the result as JSON")
@click.option("--force", is_flag=True, help="replace an existing --json file")
@one_line_errors
def eval_cmd(model, stock, text_file, n_tokens, n_ctx, recall_tokens, threads, json_path, force):
    """Perplexity of MODEL sparse and dense (and of its stock twin), per-layer predictor recall
    and precision, on text calibration never saw."""
    import dataclasses

    from .evaluate import evaluate, render
    from .outputs import check_outputs, staged

    if json_path:
        check_outputs([json_path], [p for p in (model, stock, text_file) if p], force=force)
    res = evaluate(model, stock, text_file, n_tokens, n_ctx, recall_tokens, threads,
                   progress=lambda m: click.echo(m, err=True))
    click.echo(render(res))
    if json_path:
        from pathlib import Path
        with staged() as st:
            st.file(Path(json_path)).write_text(json.dumps(dataclasses.asdict(res), indent=2) + "\n")
            st.commit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@one_line_errors
def info_cmd(model, as_json):
    """Show a GGUF's shape, activation, sizes and powerinfer metadata."""
    from .info import model_info, render

    info = model_info(model)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))
