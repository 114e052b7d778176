"""Words for the AAL brain regions: readable names, their lobe, and prose descriptions.

The vision-language recipes (recipe=ogkd, the embedded VLM's alignment) need text for each
class of data=mri-regions. The OGKD paper generates 50 descriptions per class with a large
language model; nothing here can run one, so the descriptions are HANDWRITTEN templates filled
with each region's readable name and lobe: a stand-in, with far less variety than generated
text. The lobe is the region's lobar group in data=mri (mri.aal_group).
"""

from __future__ import annotations

from ..errors import UserError

# AAL name (hemisphere suffix removed) -> readable anatomical name.
READABLE = {
    "Precentral": "precentral gyrus",
    "Frontal_Sup": "superior frontal gyrus",
    "Frontal_Sup_Orb": "orbital part of the superior frontal gyrus",
    "Frontal_Mid": "middle frontal gyrus",
    "Frontal_Mid_Orb": "orbital part of the middle frontal gyrus",
    "Frontal_Inf_Oper": "opercular part of the inferior frontal gyrus",
    "Frontal_Inf_Tri": "triangular part of the inferior frontal gyrus",
    "Frontal_Inf_Orb": "orbital part of the inferior frontal gyrus",
    "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area",
    "Olfactory": "olfactory cortex",
    "Frontal_Sup_Medial": "medial superior frontal gyrus",
    "Frontal_Med_Orb": "medial orbitofrontal cortex",
    "Rectus": "gyrus rectus",
    "Insula": "insula",
    "Cingulum_Ant": "anterior cingulate gyrus",
    "Cingulum_Mid": "middle cingulate gyrus",
    "Cingulum_Post": "posterior cingulate gyrus",
    "Hippocampus": "hippocampus",
    "ParaHippocampal": "parahippocampal gyrus",
    "Amygdala": "amygdala",
    "Calcarine": "calcarine cortex",
    "Cuneus": "cuneus",
    "Lingual": "lingual gyrus",
    "Occipital_Sup": "superior occipital gyrus",
    "Occipital_Mid": "middle occipital gyrus",
    "Occipital_Inf": "inferior occipital gyrus",
    "Fusiform": "fusiform gyrus",
    "Postcentral": "postcentral gyrus",
    "Parietal_Sup": "superior parietal lobule",
    "Parietal_Inf": "inferior parietal lobule",
    "SupraMarginal": "supramarginal gyrus",
    "Angular": "angular gyrus",
    "Precuneus": "precuneus",
    "Paracentral_Lobule": "paracentral lobule",
    "Caudate": "caudate nucleus",
    "Putamen": "putamen",
    "Pallidum": "globus pallidus",
    "Thalamus": "thalamus",
    "Heschl": "Heschl's gyrus",
    "Temporal_Sup": "superior temporal gyrus",
    "Temporal_Pole_Sup": "superior temporal pole",
    "Temporal_Mid": "middle temporal gyrus",
    "Temporal_Pole_Mid": "middle temporal pole",
    "Temporal_Inf": "inferior temporal gyrus",
    "Cerebelum_Crus1": "cerebellar crus I",
    "Cerebelum_Crus2": "cerebellar crus II",
    "Cerebelum_3": "cerebellar lobule III",
    "Cerebelum_4_5": "cerebellar lobules IV and V",
    "Cerebelum_6": "cerebellar lobule VI",
    "Cerebelum_7b": "cerebellar lobule VIIb",
    "Cerebelum_8": "cerebellar lobule VIII",
    "Cerebelum_9": "cerebellar lobule IX",
    "Cerebelum_10": "cerebellar lobule X",
    "Vermis_1_2": "vermis lobules I and II",
    "Vermis_3": "vermis lobule III",
    "Vermis_4_5": "vermis lobules IV and V",
    "Vermis_6": "vermis lobule VI",
    "Vermis_7": "vermis lobule VII",
    "Vermis_8": "vermis lobule VIII",
    "Vermis_9": "vermis lobule IX",
    "Vermis_10": "vermis lobule X",
}

# data=mri's lobar group -> where the region lies, in words.
LOBES = {"frontal": "frontal lobe", "insula-limbic": "insula and limbic lobe", "occipital": "occipital lobe",
         "parietal": "parietal lobe", "subcortical": "deep grey matter", "temporal": "temporal lobe",
         "cerebellum": "cerebellum"}

# Handwritten description templates (the paper's are generated: see the module docstring).
TEMPLATES = (
    "a T1-weighted MRI patch of the {name}.",
    "brain MRI showing the {name}.",
    "an axial MRI slice centred on the {name}.",
    "the {name}, a region of the {lobe}.",
    "grey matter of the {name} in a T1 MRI.",
    "magnetic resonance image of the {name} in the {lobe}.",
    "a close-up MRI view of the {name}.",
    "anatomy: the {name}, part of the {lobe}.",
    "T1 MRI of the {lobe} around the {name}.",
    "a patch of brain tissue from the {name}.",
)


# For data sets without region knowledge (data=folder, npz, ...): the class name alone.
GENERIC_TEMPLATES = (
    "a medical image of {name}.",
    "an image showing {name}.",
    "a scan of {name}.",
    "{name}.",
)


def merged_name(aal_name: str) -> str:
    """'Frontal_Sup_L' -> 'Frontal_Sup' (left and right are one class; the vermis has no side)."""
    return aal_name[:-2] if aal_name.endswith(("_L", "_R")) else aal_name


def readable_name(aal_name: str) -> str:
    merged = merged_name(aal_name)
    if merged not in READABLE:
        raise UserError(f"AAL region '{aal_name}' has no readable name; is aal.nii.txt the AAL atlas?")
    return READABLE[merged]


def descriptions(name: str, lobe: str) -> list[str]:
    """Every template filled in for one class."""
    return [template.format(name=name, lobe=lobe) for template in TEMPLATES]
