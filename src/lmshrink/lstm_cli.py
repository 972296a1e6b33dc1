"""CLI commands for word-level LSTM language models: ``lmshrink train-lm`` and ``lmshrink import-lm``."""

from __future__ import annotations

import json
import time

import click

from lmshrink.errors import InvalidArgument


@click.command("train-lm")
@click.argument("name", required=False)
@click.option("--list", "list_models", is_flag=True, help="List the reference models and whether they are cached.")
@click.option("--force", is_flag=True, help="Train again even if the model is cached.")
def train_lm_command(name, list_models, force):
    """Train a reference word-level LSTM LM (ptb-small, ptb-medium, wt2-small) and cache it.

    The model is saved in lmshrink format under $LMSHRINK_CACHE/word-lstm/NAME (default ~/.cache/lmshrink);
    its directory works with `lmshrink compress / eval / inspect`. Reproducible from the fixed seed.
    """
    from lmshrink.models.lstm import REFERENCES, reference_dir, train_reference

    if list_models or not name:
        for key, spec in REFERENCES.items():
            cached = (reference_dir(key) / "lmshrink.json").is_file()
            click.echo(f"{key:12s} {'cached ' if cached else 'missing'}  {spec.description}  -> {reference_dir(key)}")
        return
    if name not in REFERENCES:
        raise InvalidArgument("NAME", f"unknown reference model {name!r}", ", ".join(REFERENCES))
    directory = reference_dir(name)
    if (directory / "lmshrink.json").is_file() and not force:
        click.echo(f"{name} is cached at {directory} (use --force to train again)")
        return
    # With --force the cached model stays until the new one replaces it atomically (lmshrink.outputs).
    start = time.perf_counter()
    path = train_reference(name, log=lambda message: click.echo(message, err=True))
    history = json.loads((path / "training.json").read_text())
    click.echo(f"{name}: test perplexity {history['test']['perplexity']:.2f} after {time.perf_counter() - start:.0f}s "
               f"({history['threads']} threads) -> {path}")


@click.command("import-lm")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--corpus", required=True, help="Corpus the model was trained on: 'ptb', 'wikitext-2', or a folder with train/valid/test .txt files.")
@click.option("--out", required=True, help="Directory to write (lmshrink format): a new or empty one, or --overwrite.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow a whole pickled model (what the example's main.py --save writes). Unpickling runs code from the file: only for files you trust.")
@click.option("--overwrite", is_flag=True, help="Replace an existing lmshrink directory.")
def import_lm_command(checkpoint, corpus, out, allow_pickle, overwrite):
    """Convert a PyTorch word_language_model checkpoint (LSTM) into an lmshrink directory.

    The vocabulary is rebuilt from CORPUS exactly as the example builds it (train, valid, test in order).
    """
    from lmshrink.io import save
    from lmshrink.models.lstm import evaluate_lm, load_example_checkpoint, load_word_corpus
    from lmshrink.outputs import reserve

    # --out is checked and locked before the checkpoint is read; held until the command ends.
    output = click.get_current_context().with_resource(reserve(out, overwrite=overwrite, inputs=[checkpoint]))
    loaded = load_example_checkpoint(checkpoint, corpus, allow_pickle=allow_pickle)
    path = save(loaded, output.target, overwrite=overwrite)
    words = load_word_corpus(corpus)
    result = evaluate_lm(loaded.model, words.test, max_tokens=20000)
    click.echo(f"saved {path} ({len(words.vocab)} words); test perplexity {result['perplexity']:.2f} under the example's protocol: "
               f"first 20,000 test tokens (<eos> ends each line) as 10 parallel streams, BPTT windows of 35 with the hidden "
               f"state carried across them, {result['tokens']:,} scored (`lmshrink eval` resets the state every window: another figure)")


COMMANDS = (train_lm_command, import_lm_command)
