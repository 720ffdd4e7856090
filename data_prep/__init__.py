"""data_prep: pack COCO detection splits into HDF5 shards for parallel file systems.

    python -m data_prep synthetic --out /tmp/synth --images 64 --size 128x96 --seed 0
    python -m data_prep coco_to_hdf5 --images /tmp/synth/images \\
        --annotations /tmp/synth/annotations/instances_train.json --out /tmp/synth_h5/train
    python -m data_prep verify /tmp/synth_h5/train

Each command is also ``python -m data_prep.<command>`` and ``hvd-megdet-prep <command>``. The shard
layout is defined in ``hvd_megdet.data.h5_schema``, the only part of ``hvd_megdet`` imported here, so
packing needs neither torch nor Horovod.
"""
