#!/bin/bash
# CLReg on TOFU with OpenUnlearning: run from the OpenUnlearning repository root after
#   python /path/to/clreg_fast/integrations/open_unlearning/install.py .
# (clreg_fast installed in the same environment).

export MASTER_PORT=$(python -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1]); s.close()")

model=Llama-3.2-1B-Instruct
forget_split=forget10
retain_split=retain90
trainer=CLRegNPO            # or CLRegGradDiff, CLRegSimNPO
task_name=tofu_${model}_${forget_split}_${trainer}
common_args=(
    --config-name=unlearn.yaml
    experiment=unlearn/tofu/clreg.yaml
    trainer=${trainer}
    task_name=${task_name}
    model=${model}
    forget_split=${forget_split}
    retain_split=${retain_split}
    model.model_args.pretrained_model_name_or_path=open-unlearning/tofu_${model}_full
    retain_logs_path=saves/eval/tofu_${model}_${retain_split}/TOFU_EVAL.json
    trainer.method_args.clreg_weight=1.0
    trainer.method_args.clreg_proj_dim=256
)

if [ "${GPUS:-1}" = "1" ]; then
    # One GPU.
    CUDA_VISIBLE_DEVICES=0 python src/train.py "${common_args[@]}" \
        trainer.args.per_device_train_batch_size=8 \
        trainer.args.gradient_accumulation_steps=4
else
    # Two GPUs, DeepSpeed ZeRO-3 (OpenUnlearning's accelerate config); the head works there.
    # Each GPU's contrastive batch is its own micro-batch (clreg_negatives=local); =global uses
    # the rows of both GPUs (read README.md on the retain rows first).
    CUDA_VISIBLE_DEVICES=0,1 accelerate launch --config_file configs/accelerate/default_config.yaml \
        --main_process_port $MASTER_PORT \
        src/train.py "${common_args[@]}" \
        trainer.args.per_device_train_batch_size=4 \
        trainer.args.gradient_accumulation_steps=4
fi

# Evaluation, as for every OpenUnlearning method.
CUDA_VISIBLE_DEVICES=0 python src/eval.py \
    experiment=eval/tofu/default.yaml \
    forget_split=${forget_split} \
    model=${model} \
    task_name=${task_name} \
    model.model_args.pretrained_model_name_or_path=saves/unlearn/${task_name} \
    paths.output_dir=saves/unlearn/${task_name}/evals \
    retain_logs_path=saves/eval/tofu_${model}_${retain_split}/TOFU_EVAL.json
