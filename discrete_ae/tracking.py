"""Optional TensorBoard logging of a run (train.py's `tensorboard` knob): the training loss every log
interval, every validation metric and the epoch's grid every epoch, the config as text. The
metrics JSONL stays the source of truth; this is a view of it for TensorBoard's dashboard.

    tensorboard --logdir outputs      # each run's events are in outputs/{run}_tensorboard/
"""
import json

from discrete_ae.errors import ConfigError


class Tracker:
    def __init__(self, log_dir, config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def train_loss(self, step, loss, lr):
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, epoch, train_loss, metrics, grid_png=None):
        self.writer.add_scalar("train/epoch_loss", train_loss, epoch)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"val/{key}", value, epoch)
        if grid_png is not None:
            import numpy as np
            from PIL import Image

            with Image.open(grid_png) as img:
                self.writer.add_image("grid", np.asarray(img.convert("RGB")), epoch, dataformats="HWC")
        self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.writer.close()
