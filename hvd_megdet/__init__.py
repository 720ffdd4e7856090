"""hvd_megdet: MegDet (arXiv 1711.07240) large mini-batch Faster R-CNN training under Horovod."""

__version__ = "0.1.0"
