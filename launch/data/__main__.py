"""Look at what training sees, token by token: a recipe's examples with their ids, pieces and supervised mask side by
side (the first thing to check when labels look wrong).

    python -m launch.data --config recipes/tiny-full.yaml --show 2
    python -m launch.data --config RECIPE --show 1 --index 123 --split eval [--section.key value ...]
    python -m launch.data --config MIXTURE_RECIPE --source NAME --show 2    (default: the first of data.sources)
"""

from __future__ import annotations

import argparse
import sys

from launch.config import ConfigError, parse_config, source_data, source_name


def show(examples, tokenizer, indices: list[int], out=sys.stdout) -> None:
    from launch.data import IGNORE_INDEX

    for index in indices:
        example = examples[index]
        ids, labels = example["input_ids"], example["labels"]
        supervised = sum(label != IGNORE_INDEX for label in labels)
        print(f"example {index}: {len(ids)} tokens, {supervised} supervised (* = in the loss)", file=out)
        print(f"  {'pos':>5} {'id':>7}  {'':1} piece", file=out)
        for position, (token, label, piece) in enumerate(zip(ids, labels, tokenizer.convert_ids_to_tokens(ids))):
            mark = "*" if label != IGNORE_INDEX else " "
            print(f"  {position:>5} {token:>7}  {mark} {piece!r}", file=out)
        print(f"  text:       {tokenizer.decode(ids)!r}", file=out)
        answer = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        print(f"  supervised: {tokenizer.decode(answer)!r}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, default=1, help="how many examples to print")
    parser.add_argument("--index", type=int, default=0, help="the first example to print")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--source", default=None, help="with data.sources: which source (by name)")
    args, rest = parser.parse_known_args(argv)
    from backbones import build_backbone
    from launch.data import DataError, build_tokenized

    try:
        config = parse_config(rest)
        data = config.data
        if data.sources:
            names = [source_name(source) for source in data.sources]
            if args.source not in (None, *names):
                raise ConfigError(f"--source {args.source} is not a source of this recipe; its sources: "
                                  f"{', '.join(names)}")  # fmt: skip
            data = source_data(data, data.sources[names.index(args.source or names[0])])
        backbone = build_backbone(config.model.backbone, path=config.model.path, load_weights=False)
        examples = build_tokenized(data, backbone, args.split, packing=False).dataset
    except (ConfigError, DataError, OSError) as error:
        print(f"shardtune data: {error}", file=sys.stderr)
        return 2
    if not 0 <= args.index < len(examples):
        print(f"shardtune data: --index {args.index} is outside the {len(examples)} examples of the {args.split} split",
              file=sys.stderr)  # fmt: skip
        return 2
    show(examples, backbone.tokenizer, list(range(args.index, min(len(examples), args.index + args.show))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
