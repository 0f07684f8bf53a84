"""`lvd demo`: the offline demo data (Fashion-MNIST, real photos, a long-tailed pool), the runs over
them and the quality measured against what was planted (`run.run_demo`)."""
