# Evaluation of the stage-2 model on the window's samples: metrics.json (DVC metrics), per-case figures and
# meshes, training curves (DVC plots).


rule evaluate:
    input:
        ckpt=rules.train_stage2.output,
        manifest=f"{RESULTS}/manifests/{{window}}.csv",
    output:
        metrics=f"{RESULTS}/eval/{{window}}/metrics.json",
        curves=f"{RESULTS}/eval/{{window}}/training_curves.csv",
    log:
        "logs/eval/{window}.log",
    params:
        out_dir=lambda wc: f"{RESULTS}/eval/{wc.window}",
        train_log=lambda wc: f"{RESULTS}/train/{wc.window}/stage2/metrics.csv",
        windowed=lambda wc: f"{RESULTS}/windowed/{wc.window}",
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
    shell:
        "{CTVQ} eval --ckpt {input.ckpt} --data {input.manifest} -o {output.metrics} --output-dir {params.out_dir}"
        " --train-log {params.train_log} --windowed-dir {params.windowed} > {log} 2>&1"
