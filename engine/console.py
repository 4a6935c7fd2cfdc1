"""What the terminal shows: the config tree, progress bars with ETA, the final summary table."""

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
from rich.tree import Tree

console = Console()


def print_config_tree(cfg: DictConfig, first: tuple[str, ...] = ("model", "data", "optim")) -> None:
    tree = Tree("config", guide_style="dim")
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first]
    for key in keys:
        value = cfg[key]
        if isinstance(value, DictConfig):
            branch = tree.add(f"[bold]{key}")
            branch.add(OmegaConf.to_yaml(value, resolve=True).rstrip() or "{}")
        else:
            tree.add(f"[bold]{key}[/]: {value}")
    console.print(tree)


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
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
