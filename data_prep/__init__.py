"""data_prep: pack COCO detection splits into HDF5 shards for parallel file systems."""
