"""A third method, defined outside the package, that trains through train.py unchanged
(``method: _tiny_method:TinySegmenter`` with this folder on PYTHONPATH): a few convolutions
that map [support image | support mask | query image] to the query mask."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsmis.data.batch import collate, slices_to_model
from fsmis.methods.base import Predictor
from fsmis.methods.episodic import EpisodicMethod


@dataclass
class TinyConfig:
    width: int = 8
    delay: float = 0.0  # seconds of sleep per loss / prediction call (tests that stop a run midway)


class TinyNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, s_img, s_msk, q_img):
        return self.body(torch.cat([s_img, s_msk, q_img], 1))


class TinySegmenter(EpisodicMethod):
    name = "tiny"
    model_config = TinyConfig

    def build(self):
        self.module = TinyNet(self.cfg.model.width)

    def batch(self, step, micro):
        episodes, rng = self.episodes(step, micro)
        return collate(episodes, self.cfg.data.image_size).to(self.device)

    def loss(self, b, generator):
        if self.cfg.model.delay:
            time.sleep(self.cfg.model.delay)
        logits = self.module(b.support_images, b.support_masks, b.query_images)
        return F.binary_cross_entropy_with_logits(logits, b.query_masks)

    def predictor(self, checkpoint=None):
        return TinyPredictor(self.module, self.cfg.data.image_size, self.device, self.cfg.model.delay)


class TinyPredictor(Predictor):
    name = "tiny"
    normalization = "minmax"

    def __init__(self, net, size, device, delay=0.0):
        self.net, self.size, self.device, self.delay = net, size, device, delay

    @torch.no_grad()
    def predict(self, support_images, support_masks, query_images):
        if self.delay:
            time.sleep(self.delay)
        q, h, w = query_images.shape
        s_img = slices_to_model(support_images[:1], self.size, "image", self.device).expand(q, -1, -1, -1)
        s_msk = slices_to_model(support_masks[:1], self.size, "mask", self.device).expand(q, -1, -1, -1)
        prob = torch.sigmoid(self.net(s_img, s_msk, slices_to_model(query_images, self.size, "image", self.device)))
        prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return (prob.cpu().numpy() > 0.5).astype(np.uint8)
