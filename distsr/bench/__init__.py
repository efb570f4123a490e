"""Benchmarks, one module each, behind the thin command lines ``jobs/bench_<name>.py``:

* ``kd``       one small student distilled four ways from pretrained ncnn teachers (CPU)
* ``fkdiff``   FKdiff's FASRer_S with PHexKD vs alone vs bicubic (reuses ``kd``'s stages)
* ``fkdiff_efficiency``  the FKdiff Table-2 style table (``distsr.evaluate.efficiency``)
* ``infer``    seconds per image of the one-step student vs the multi-step teacher
* ``loader``   samples/s of the training reader, input shards alone and joined with a cache
* ``compile``  training / inference steps/s with and without ``engine.compile`` and
               ``engine.channels_last`` (real ``Trainer`` arms: DeepSpeed stays in ``engine``)
* ``cache``    TAD-SR student steps/s from the teacher cache vs the live teacher (the job adds
               the Ray caching)
* ``stats``    median and range: how every benchmark reports repeats
* ``cli``      the command line, the ``threads`` key and the JSON / markdown outputs they share

Importing the package imports none of them.
"""
