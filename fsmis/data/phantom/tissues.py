"""Tissue classes (what a voxel is made of, rendered to intensities) and label ids (what the
label files store: SABS ids for CT, CHAOS ids for MR)."""
from __future__ import annotations

CT_LABELS = {
    "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4,
    "liver": 6, "stomach": 7, "aorta": 8, "ivc": 9,
}
MR_LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
TEST_LABELS = ["liver", "spleen", "left_kidney", "right_kidney"]

AIR, SUBFAT, MUSCLE, FAT, CORTBONE, MARROW, CSF, AORTA, IVC, LIVER, LIVER_VESSEL, SPLEEN, \
    KID_CORTEX, KID_MEDULLA, KID_PELVIS, STOMACH_WALL, STOMACH_FLUID, STOMACH_FOOD, GAS, \
    BOWEL_WALL, BOWEL_CONTENT, FECES, GALLBLADDER, LUNG = range(24)
N_TISSUES = 24


def labels_for(modality: str) -> dict:
    """Label ids of ``modality`` ("ct" or "mr")."""
    return CT_LABELS if modality == "ct" else MR_LABELS
