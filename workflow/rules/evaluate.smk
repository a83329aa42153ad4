# Evaluation of the stage-2 model on the window's samples: metrics.json (DVC metrics), per-case figures and
# meshes, training curves (DVC plots). When no case has a reconstructed surface (a collapsed tokenizer)
# `ctvq eval` exits 3 and the job fails; evaluate.allow_collapse: true passes --allow-collapse.


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
        ctvq=CTVQ,
        out_dir=lambda wc: f"{RESULTS}/eval/{wc.window}",
        train_log=lambda wc: f"{RESULTS}/train/{wc.window}/stage2/metrics.csv",
        allow_collapse="--allow-collapse" if config["evaluate"]["allow_collapse"] else "",
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
    shell:
        "{params.ctvq} eval --ckpt {input.ckpt} --data {input.manifest} -o {output.metrics} --output-dir {params.out_dir}"
        " --train-log {params.train_log} {params.allow_collapse} > {log} 2>&1"
