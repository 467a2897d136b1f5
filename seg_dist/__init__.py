"""seg_dist: distributed semantic-segmentation training on WebDataset shards."""

__version__ = "0.1.0"
