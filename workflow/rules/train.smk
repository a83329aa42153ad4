# Training, per window in train.windows: stage 1 (codebook) -> stage 2 (joint), stage 2 starts from stage 1's
# final checkpoint. A rule given more than one GPU runs torchrun with one process per GPU.


# in params: (not pasted into the shell from a global) so that changing train.max_steps reruns training
MAX_STEPS = f" --max-steps {TRAIN['max_steps']}" if TRAIN.get("max_steps") else ""


localrules:
    plan,


# The memory requests of a window's stage (train.mem_mb or evaluate.mem_mb null): `ctvq plan`'s prediction
# for the config on the manifest's largest cases, +25 %.
rule plan:
    input:
        manifest=f"{RESULTS}/manifests/{{window}}.csv",
        config=lambda wc: TRAIN[f"stage{wc.stage}_config"],
    output:
        plan_file("{stage}"),
    log:
        "logs/plan/{window}/stage{stage}.log",
    params:
        ctvq=CTVQ,
        eval_chunk=lambda wc: PLAN_EVAL_CHUNK_ARG if wc.stage == "2" else "",
        resolution=resolution_of,
    shell:
        "{params.ctvq} plan --config {input.config} --data {input.manifest} --resolution {params.resolution}"
        "{params.eval_chunk}"
        " --requests-out {output} > {log} 2>&1"


rule train_stage1:
    input:
        manifest=f"{RESULTS}/manifests/{{window}}.csv",
        config=TRAIN["stage1_config"],
        **plan_input(1, PLAN_TRAIN),
    output:
        f"{RESULTS}/train/{{window}}/stage1/ckpts/final.pt",
    log:
        "logs/train/{window}/stage1.log",
    benchmark:
        "logs/benchmark/train/{window}/stage1.tsv"
    params:
        run_dir=lambda wc: f"{RESULTS}/train/{wc.window}/stage1",
        launcher=_train_launcher,
        band=band_of,
        resolution=resolution_of,
        max_steps=MAX_STEPS,
        start="",
    threads: TRAIN["threads"]
    resources:
        gpu=TRAIN["gpus"],
        mem_mb=planned_mem_mb("train_mem_mb", TRAIN["mem_mb"]),
        runtime=TRAIN["runtime_minutes"],
    shell:
        "{params.launcher} train --config {input.config} --data {input.manifest} --output-dir {params.run_dir}"
        " --window {wildcards.window} --band {params.band} --resolution {params.resolution}{params.start} --threads {threads}{params.max_steps}"
        " > {log} 2>&1"


# Stage 2: the same job, on the stage-2 config, starting from stage 1's final checkpoint.
use rule train_stage1 as train_stage2 with:
    input:
        manifest=f"{RESULTS}/manifests/{{window}}.csv",
        config=TRAIN["stage2_config"],
        stage1=rules.train_stage1.output,
        **plan_input(2, PLAN_TRAIN),
    output:
        f"{RESULTS}/train/{{window}}/stage2/ckpts/final.pt",
    log:
        "logs/train/{window}/stage2.log",
    benchmark:
        "logs/benchmark/train/{window}/stage2.tsv"
    params:
        run_dir=lambda wc: f"{RESULTS}/train/{wc.window}/stage2",
        launcher=_train_launcher,
        band=band_of,
        resolution=resolution_of,
        max_steps=MAX_STEPS,
        start=lambda wc, input: f" --pretrained-vae-path {input.stage1}",
