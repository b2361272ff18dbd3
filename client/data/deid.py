"""De-identification check: what in a DICOM export could identify a patient.

Reports, per attribute and count (never the values), what the DICOM PS3.15 Annex E
Basic Application Level Confidentiality Profile (Table E.1-1) would remove or replace
and is still present and non-empty, private tags (the profile removes them, action X),
``BurnedInAnnotation = YES`` (PS3.3 C.7.6.1.1.5: identifying text drawn into the pixels),
and identifiers in file or folder names (UID-, date- or record-number-like tokens, or the
file's own PatientID / PatientName / AccessionNumber).

UIDs (Annex E action U, "replace with a non-identifying UID") cannot be told apart from
replacement UIDs by looking at them; they are reported unless the data set declares
``PatientIdentityRemoved = YES`` (PS3.15 E.1.1, what a de-identifier must set).

Imports pydicom only (no torch, no flwr): runs on a minimal hospital install.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from client.data.dicom_read import (
    UnusableInputError,
    discover_files,
    load_bytes,
    parse_dataset,
    quiet_pydicom_logs,
)

__all__ = [
    "ANNEX_E_KEYWORDS",
    "DeidReport",
    "FileFindings",
    "check_dataset",
    "check_directory",
    "filename_findings",
    "identifier_tokens",
]

#: Attributes of PS3.15 Annex E Table E.1-1 (Basic Application Level Confidentiality
#: Profile) by pydicom keyword: those with action X, Z, D, U or a combination.
ANNEX_E_KEYWORDS: frozenset[str] = frozenset(
    """
    AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate
    AcquisitionDateTime AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription
    AcquisitionTime ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial
    AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
    AdmittingTime AffectedSOPInstanceUID Allergies AuthorObserverSequence BranchOfService
    CassetteID CommentsOnThePerformedProcedureStep ConcatenationUID
    ConfidentialityConstraintOnPatientDataDescription ContentCreatorName
    ContentCreatorIdentificationCodeSequence ContentDate ContentSequence ContentTime
    ContextGroupExtensionCreatorUID ContrastBolusAgent ContributionDescription
    CountryOfResidence CreatorVersionUID CurrentPatientLocation CurveDate CurveTime
    CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription DetectorID
    DeviceSerialNumber DeviceUID DigitalSignatureUID DigitalSignaturesSequence
    DimensionOrganizationUID DischargeDiagnosisDescription DistributionAddress
    DistributionName DoseReferenceUID EthnicGroup FailedSOPInstanceUIDList FiducialUID
    FillerOrderNumberImagingServiceRequest FrameComments FrameOfReferenceUID GantryID
    GeneratorID GraphicAnnotationSequence HumanPerformerName HumanPerformerOrganization
    IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
    ImagingServiceRequestComments Impressions InstanceCreationDate InstanceCreationTime
    InstanceCreatorUID InstitutionAddress InstitutionCodeSequence InstitutionName
    InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
    InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence
    InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
    InterpretationIDIssuer InterpretationRecorder InterpretationText
    InterpretationTranscriber IrradiationEventUID IssuerOfAdmissionID IssuerOfPatientID
    IssuerOfServiceEpisodeID LargePaletteColorLookupTableUID MAC MedicalAlerts
    MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDescription
    ModifyingDeviceID NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults
    Occupation OperatorIdentificationSequence OperatorsName OriginalAttributesSequence
    OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation OtherPatientIDs
    OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime
    PaletteColorLookupTableUID ParticipantSequence PatientAddress PatientAge
    PatientAlternativeCalendar PatientBirthDate PatientBirthDateInAlternativeCalendar
    PatientBirthName PatientBirthTime PatientComments PatientDeathDateInAlternativeCalendar
    PatientID PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
    PatientReligiousPreference PatientSex PatientSexNeutered PatientSize PatientState
    PatientTelephoneNumbers PatientTransportArrangements PatientWeight PerformedLocation
    PerformedProcedureStepDescription PerformedProcedureStepEndDate
    PerformedProcedureStepEndTime PerformedProcedureStepID
    PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
    PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence PersonName
    PersonTelephoneNumbers PhysicianApprovingInterpretation
    PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord
    PhysiciansOfRecordIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID
    PreMedication PregnancyStatus ProtocolName ReasonForStudy
    ReasonForTheImagingServiceRequest ReferencedDigitalSignatureSequence
    ReferencedFrameOfReferenceUID ReferencedImageSequence ReferencedPatientAliasSequence
    ReferencedPatientPhotoSequence ReferencedPatientSequence
    ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedStudySequence
    ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
    ReferringPhysicianName ReferringPhysicianTelephoneNumbers RegionOfResidence
    RelatedFrameOfReferenceUID RequestAttributesSequence RequestedContrastAgent
    RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
    RequestedProcedureLocation RequestedSOPInstanceUID RequestingPhysician RequestingService
    ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
    RouteOfAdmissions ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
    ScheduledProcedureStepEndTime ScheduledProcedureStepLocation
    ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    SeriesDate SeriesDescription SeriesInstanceUID SeriesTime ServiceEpisodeDescription
    ServiceEpisodeID SmokingStatus SOPInstanceUID SourceImageSequence SourceSerialNumber
    SpecialNeeds StationName StorageMediaFileSetUID StudyComments StudyDate
    StudyDescription StudyID StudyIDIssuer StudyInstanceUID StudyTime
    SynchronizationFrameOfReferenceUID TemplateExtensionCreatorUID
    TemplateExtensionOrganizationUID TextComments TextString TimezoneOffsetFromUTC
    TopicAuthor TopicKeywords TopicSubject TopicTitle TransactionUID UID
    VerifyingObserverIdentificationCodeSequence VerifyingObserverName
    VerifyingObserverSequence VerifyingOrganization VisitComments
    """.split()  # noqa: SIM905 (a word list is easier to check against Table E.1-1)
)

#: Annex E attributes with action U (replace by a consistent, non-identifying UID).
UID_KEYWORDS: frozenset[str] = frozenset(k for k in ANNEX_E_KEYWORDS if k.endswith("UID"))

# File-name patterns that look like identifiers (PS3.15 E.1: names may carry PHI).
_ANNEX_E_TAGS: dict[int, str] = {
    int(t): k for k in ANNEX_E_KEYWORDS if (t := tag_for_keyword(k)) is not None
}
_UID_TAGS: frozenset[int] = frozenset(t for t, k in _ANNEX_E_TAGS.items() if k in UID_KEYWORDS)

_FILENAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "uid_like": re.compile(r"(?<![\d.])\d+(?:\.\d+){3,}"),
    "date_like": re.compile(
        r"(?<!\d)(?:19|20)\d\d[-_.]?(?:0[1-9]|1[0-2])[-_.]?(?:0[1-9]|[12]\d|3[01])(?!\d)"
    ),
    "long_number": re.compile(r"\d{7,}"),
}
_TOKEN_SPLIT = re.compile(r"[^0-9a-z]+")


@dataclass
class FileFindings:
    """Identifying content of one file (attribute keywords and counts, no values).

    Attributes
    ----------
    attributes : set of str
        Annex E keywords present and non-empty (at any nesting depth).
    private_elements : int
        Private data elements (odd group), private creators included.
    burned_in_annotation : bool
        ``BurnedInAnnotation`` is ``YES``.
    filename : set of str
        Kinds of identifier found in the file's relative path.

    """

    attributes: set[str] = field(default_factory=set)
    private_elements: int = 0
    burned_in_annotation: bool = False
    filename: set[str] = field(default_factory=set)

    @property
    def has_findings(self) -> bool:
        """Whether anything identifying was found."""
        return bool(
            self.attributes or self.private_elements or self.burned_in_annotation or self.filename
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (keywords and counts only)."""
        return {
            "attributes": sorted(self.attributes),
            "private_elements": self.private_elements,
            "burned_in_annotation": self.burned_in_annotation,
            "filename": sorted(self.filename),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileFindings:
        """Inverse of :meth:`to_dict`."""
        return cls(
            attributes=set(d.get("attributes", ())),
            private_elements=int(d.get("private_elements", 0)),
            burned_in_annotation=bool(d.get("burned_in_annotation", False)),
            filename=set(d.get("filename", ())),
        )


def _non_empty(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes):
        return bool(value.strip(b" \x00"))
    if isinstance(value, str):
        return bool(value.strip(" \x00"))
    try:
        return len(value) > 0
    except TypeError:
        return True


def check_dataset(ds: Dataset) -> FileFindings:
    """Annex E attributes, private tags and burned-in annotation of one data set.

    Elements are inspected without converting their values (raw bytes are checked for
    emptiness), so the check costs little and malformed values cannot stop it.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A parsed data set (nested sequences are searched too).

    Returns
    -------
    FileFindings
        With ``filename`` empty (see :func:`filename_findings`).

    """
    found = FileFindings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        try:
            removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
        except Exception:
            removed = False
        skip = _UID_TAGS if removed else frozenset()
        _walk(ds, found, skip, depth=0)
        try:
            burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
        except Exception:
            burned = False
        found.burned_in_annotation = burned
    return found


def _walk(ds: Dataset, found: FileFindings, skip: frozenset[int], *, depth: int) -> None:
    if depth > 16:  # pathological nesting
        return
    for elem in ds.elements():
        tag = elem.tag
        if tag.is_private:
            found.private_elements += 1
            continue
        value = elem.value
        if isinstance(value, list) and value and isinstance(value[0], Dataset):
            for item in value:
                _walk(item, found, skip, depth=depth + 1)
        kw = _ANNEX_E_TAGS.get(int(tag))
        if kw is None or int(tag) in skip:
            continue
        try:
            present = _non_empty(value)
        except Exception:
            present = True  # unreadable value: assume the worst
        if present:
            found.attributes.add(kw)


def identifier_tokens(ds: Dataset) -> set[str]:
    """Lower-case tokens of PatientID, PatientName and AccessionNumber (>= 3 chars).

    Used only to look for the same tokens in file names; identifying: hash or discard.
    """
    tokens: set[str] = set()
    with warnings.catch_warnings():
        # pydicom's validation warnings quote header values, which may be PHI.
        warnings.simplefilter("ignore")
        for kw in ("PatientID", "PatientName", "AccessionNumber", "OtherPatientIDs"):
            try:
                value = ds.get(kw, None)
            except Exception:
                continue
            if value is None:
                continue
            text = str(value).lower()
            tokens.update(t for t in _TOKEN_SPLIT.split(text) if len(t) >= 3)
            if len(text.strip()) >= 3:
                tokens.add(text.strip())
    return tokens


def _hash_token(token: str, salt: bytes) -> str:
    return hashlib.sha256(salt + token.encode("utf-8", "surrogateescape")).hexdigest()


def hash_tokens(tokens: Iterable[str], salt: bytes) -> set[str]:
    """Salted SHA-256 of each token (to cache :func:`identifier_tokens` safely)."""
    return {_hash_token(t, salt) for t in tokens}


def filename_findings(
    rel_path: str | PurePosixPath, tokens: Iterable[str] = (), *, salt: bytes | None = None
) -> set[str]:
    """Kinds of identifier in a relative path (the values are never returned).

    Parameters
    ----------
    rel_path : str or PurePosixPath
        Path relative to the export root (the root itself is chosen by the user).
    tokens : Iterable[str]
        :func:`identifier_tokens` of the file, or their salted hashes when ``salt``.
    salt : bytes, optional
        Salt the ``tokens`` were hashed with.

    Returns
    -------
    set of str
        Subset of ``{"uid_like", "date_like", "long_number", "header_identifier"}``.

    """
    text = str(rel_path).lower()
    kinds = {kind for kind, rx in _FILENAME_PATTERNS.items() if rx.search(text)}
    tokens = set(tokens)
    if tokens:
        parts = {t for t in _TOKEN_SPLIT.split(text) if t}
        parts.update(PurePosixPath(text).parts)
        parts.update(PurePosixPath(p).stem for p in PurePosixPath(text).parts)
        if salt is not None:
            parts = hash_tokens(parts, salt)
        if parts & tokens:
            kinds.add("header_identifier")
    return kinds


@dataclass
class DeidReport:
    """Counts over a directory: per attribute, the number of files carrying it.

    Attributes
    ----------
    files_seen : int
        Files found under the directory.
    files_checked : int
        Files that parsed as DICOM and were checked.
    files_with_findings : int
        Checked files with at least one finding.
    attributes : collections.Counter
        Annex E keyword -> number of files where it is present and non-empty.
    private_tag_files, private_elements : int
        Files with private tags; private elements in total.
    burned_in_annotation : int
        Files declaring ``BurnedInAnnotation = YES``.
    filename : collections.Counter
        Identifier kind in file names -> number of files.

    """

    files_seen: int = 0
    files_checked: int = 0
    files_with_findings: int = 0
    attributes: Counter[str] = field(default_factory=Counter)
    private_tag_files: int = 0
    private_elements: int = 0
    burned_in_annotation: int = 0
    filename: Counter[str] = field(default_factory=Counter)

    def add(self, f: FileFindings) -> None:
        """Count one checked file."""
        self.files_checked += 1
        self.files_with_findings += int(f.has_findings)
        self.attributes.update(f.attributes)
        self.private_tag_files += int(f.private_elements > 0)
        self.private_elements += f.private_elements
        self.burned_in_annotation += int(f.burned_in_annotation)
        self.filename.update(f.filename)

    @property
    def has_findings(self) -> bool:
        """Whether any checked file could identify a patient."""
        return self.files_with_findings > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (keywords and counts, never values)."""
        return {
            "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "files_seen": self.files_seen,
            "files_checked": self.files_checked,
            "files_with_findings": self.files_with_findings,
            "attributes": dict(sorted(self.attributes.items())),
            "private_tag_files": self.private_tag_files,
            "private_elements": self.private_elements,
            "burned_in_annotation": self.burned_in_annotation,
            "filename_identifiers": dict(sorted(self.filename.items())),
        }


def check_directory(root: str | os.PathLike[str]) -> DeidReport:
    """Check every file under ``root`` (found by content, as ``medfed ingest`` does).

    Files that are not DICOM or cannot be parsed are counted in ``files_seen`` only.
    """
    base = Path(root)
    report = DeidReport()
    with quiet_pydicom_logs():
        for path in discover_files(base):
            _check_file(base, path, report)
    return report


def _check_file(base: Path, path: Path, report: DeidReport) -> None:
    report.files_seen += 1
    try:
        ds = parse_dataset(load_bytes(path))
    except UnusableInputError:
        return
    findings = check_dataset(ds)
    findings.filename = filename_findings(path.relative_to(base).as_posix(), identifier_tokens(ds))
    report.add(findings)
