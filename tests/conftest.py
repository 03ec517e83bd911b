import os
os.environ.setdefault("HEPTAPOD_FAST", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
import torch
torch.set_num_threads(1)   # oversubscribed 2-core CI boxes: 2 spin-waiting threads can be 20x slower
