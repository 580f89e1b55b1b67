"""augplug inside other libraries' workflows (a timm task, training scripts), shipped with the package.

=======================================  ===============================  ==============================
module                                   console script                   needs
=======================================  ===============================  ==============================
:mod:`~.timm_task`                       none (a ``timm.task`` class)     timm >= 1.0.23
:mod:`~.timm_train`                      ``augplug-timm-train``           timm >= 1.0.27; ``augplug[demo]``
                                                                          for ``--dataset digits``
:mod:`~.accelerate_train`                ``augplug-accelerate-train``     accelerate; ``augplug[demo]``
                                         (or ``accelerate launch -m
                                         augplug.integrations.
                                         accelerate_train``)
:mod:`~.albumentations_example`          ``augplug-albumentations-        ``augplug[albumentations,demo]``
                                         example``
=======================================  ===============================  ==============================

Each script module's ``main(argv)`` runs in-process and returns what it trained. Nothing is imported here, so
``import augplug.integrations`` stays cheap.
"""
