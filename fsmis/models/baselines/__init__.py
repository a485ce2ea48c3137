"""Baseline few-shot segmentation models (PANet, SSL-ALPNet, ADNet, UniverSeg) and their backbones."""
