# shellcheck shell=bash
# Site setup, sourced by jobs/slurm/megdet.sbatch and jobs/pbs/megdet.pbs before the launch.
# Edit this file once per cluster; the templates themselves need no edits.

# --- Software -------------------------------------------------------------------------------------
# module load cuda/12.4 nccl openmpi/4.1            # whatever your site calls them
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate megdet
# export PYTHON=python HOROVODRUN=horovodrun MPIRUN=mpirun
#
# The repository's venv (`make setup`) unless the submitting shell had an environment active (sbatch
# and `qsub -V` export it) or MEGDET_VENV names another one (empty: activate none). The job checks
# before launching that the launcher and a Python importing hvd_megdet and horovod are on PATH.
_megdet_venv=${MEGDET_VENV-$MEGDET_ROOT/.venv}
if [[ -z ${VIRTUAL_ENV:-}${CONDA_PREFIX:-} && -n $_megdet_venv && -f $_megdet_venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "$_megdet_venv/bin/activate"
fi
unset _megdet_venv

# --- NCCL (GPU all-reduce) ------------------------------------------------------------------------
# export NCCL_DEBUG=INFO                 # first run on a new cluster: prints rings, transports, NICs
# export NCCL_SOCKET_IFNAME=ib0          # bootstrap interface; hangs at start often mean a wrong one
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # restrict to the InfiniBand adapters next to the GPUs
# export NCCL_IB_DISABLE=1               # Ethernet-only clusters
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA when NIC and GPU share a PCIe switch
# export NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank aborts the job instead of hanging it

# --- UCX / Open MPI (CPU-side MPI traffic, Horovod's control plane) -------------------------------
# export MPIRUN_ARGS="-mca pml ucx"     # LAUNCHER=mpirun over UCX instead of ob1/TCP (UCX_* are passed)
# export UCX_NET_DEVICES=mlx5_0:1
# export UCX_TLS=rc,sm,self
# export OMPI_MCA_btl_tcp_if_include=ib0  # keep MPI's TCP off management networks

# --- Horovod --------------------------------------------------------------------------------------
# export HOROVOD_TIMELINE=$PWD/timeline.json     # trace of every collective (large file)
# export HOROVOD_FUSION_THRESHOLD=67108864              # tensor fusion buffer, bytes
# export HOROVOD_CYCLE_TIME=5                           # ms between fusion cycles
# export HOROVOD_STALL_CHECK_TIME_SECONDS=120           # report ranks that stop submitting tensors
