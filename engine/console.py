"""What the terminal shows: the config tree, progress bars with ETA, the final summary table."""

import os

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()


def print_config_tree(cfg: DictConfig, first: tuple[str, ...] = ("model", "data", "optim")) -> None:
    """The resolved config as a tree of YAML blocks. Lines are never wrapped or cut at the
    terminal's width (rich's Tree does both): a path in it is one line a user can copy."""
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first]
    text = Text("config\n")
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        value = cfg[key]
        text.append("└── " if last else "├── ", style="dim")
        text.append(str(key), style="bold")
        if isinstance(value, DictConfig):
            block = OmegaConf.to_yaml(value, resolve=True).rstrip() or "{}"
            indent = "    " if last else "│   "
            for line in block.splitlines():
                text.append("\n" + indent, style="dim")
                text.append(line)
        else:
            text.append(f": {value}")
        text.append("\n")
    console.print(text, end="", soft_wrap=True)


class ImagesPerSecond(ProgressColumn):
    """Images per second of a task whose steps are batches of its `images_per_batch` field:
    rich's own speed estimate (steps per second over the last 30 s) times that. Host numbers
    only: showing it costs the loop no sync."""

    def render(self, task) -> Text:
        per_batch = task.fields.get("images_per_batch")
        if not per_batch or task.speed is None:
            return Text("")
        return Text(f"{task.speed * per_batch:,.0f} images/s")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        ImagesPerSecond(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        # each redraw holds the GIL for ~4 ms in a terminal: rich's default 10 per second cost
        # the loop 8-10% of a small CNN's speed on CPU (analysis/benchmark.py), 2 costs ~1%
        refresh_per_second=2,
        transient=False,
    )


def print_summary(title: str, rows: dict) -> None:
    """A table of the numbers; paths below it, one per line, never wrapped or cut (a user
    copies them into the next command)."""
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    paths = {}
    for key, value in rows.items():
        if isinstance(value, os.PathLike) or (isinstance(value, str) and os.sep in value):
            paths[key] = value
        else:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(Text(title, style="bold"), soft_wrap=True)
    if table.row_count:
        console.print(table)
    for key, value in paths.items():
        console.print(Text.assemble((f"{key}: ", "bold"), str(value)), soft_wrap=True)
