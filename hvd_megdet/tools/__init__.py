"""The commands for after training, each ``python -m hvd_megdet.tools.<name>``; training never needs them.

    evaluate        COCO mmAP of a checkpoint, on every rank
    predict         detections drawn on images and written as COCO results
    export          one file that plain torchvision rebuilds, without hvd_megdet
    report          the paper's Table 3 row and figures from run directories
                    (report_runs reads a run, report_figures draws the PNGs)
    plan            nodes and hours for a config (plan_time_model: the terms;
                    plan_table3: the fit to the paper's Table 3)
    fetch_weights   torchvision's ImageNet ResNet weights, verified, for a login node

The training core (hvd_megdet/*.py) imports none of these, with one exception: train.py writes the
report at the end of a run.
"""
