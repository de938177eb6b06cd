// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title ImageAllowlist
/// @notice On-chain allowlist of AWS Nitro Enclave images for attested key release.
/// An image is identified by OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) over the raw PCR
/// bytes. Every allowed image belongs to exactly one application id (bytes32); the KMS derives
/// the application's keys from that id, so all allowed images of one application (for example
/// the old and the new image during a rolling upgrade) obtain the same keys.
/// @dev The add/remove/allowedOsImages names and the OsImageHashAdded/OsImageHashRemoved events
/// keep the surface of dstack's KMS contract, so tooling written for it can read this one.
/// The application binding is carried by OsImageHashAssigned, emitted next to OsImageHashAdded.
contract ImageAllowlist {
    /// @notice sha256 of 144 zero bytes: the OS_IMAGE_HASH of a debug-mode enclave, whose
    /// PCR0, PCR1 and PCR2 are all zero. A debug enclave can be inspected by its host.
    bytes32 public constant DEBUG_OS_IMAGE_HASH =
        0x81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f;

    /// @notice The block this contract was deployed in: where event scans start.
    uint256 public immutable deploymentBlock;

    /// @notice The account allowed to change the allowlist (an EOA, a multisig or a timelock).
    address public owner;

    /// @notice The account that may accept ownership; zero when no transfer is under way.
    address public pendingOwner;

    /// @dev Image hash => application id. Zero means "not allowed": application ids are never
    /// zero, so one storage slot answers both questions.
    mapping(bytes32 => bytes32) private _applicationOf;

    /// @notice The address of the KMS's secp256k1 signer: the key that signs the provenance
    /// statements of the secp256k1 keys the KMS releases (EIP-712, see ProvenanceCheck.sol).
    /// Zero: none registered, so no statement verifies on chain.
    address public signer;

    event OsImageHashAdded(bytes32 osImageHash);
    event OsImageHashRemoved(bytes32 osImageHash);
    event OsImageHashAssigned(bytes32 indexed osImageHash, bytes32 indexed appId);
    event OwnershipTransferStarted(address indexed previousOwner, address indexed newOwner);
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event SignerChanged(address indexed previousSigner, address indexed newSigner);

    error NotOwner(address caller);
    error NotPendingOwner(address caller);
    error ZeroAddress();
    error ZeroOsImageHash();
    error DebugOsImageHash();
    error ZeroApplication();
    error OsImageHashAlreadyAllowed(bytes32 osImageHash, bytes32 appId);
    error OsImageHashNotAllowed(bytes32 osImageHash);

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    constructor(address initialOwner) {
        if (initialOwner == address(0)) revert ZeroAddress();
        deploymentBlock = block.number;
        owner = initialOwner;
        emit OwnershipTransferred(address(0), initialOwner);
    }

    /// @notice Allow an image and bind it to an application. Reverts when the hash is zero,
    /// is the debug-enclave hash, or is already allowed (for any application: an allowed image
    /// is never silently moved to another application; remove it first).
    function addOsImageHash(bytes32 osImageHash, bytes32 appId) external onlyOwner {
        if (osImageHash == bytes32(0)) revert ZeroOsImageHash();
        if (osImageHash == DEBUG_OS_IMAGE_HASH) revert DebugOsImageHash();
        if (appId == bytes32(0)) revert ZeroApplication();
        bytes32 current = _applicationOf[osImageHash];
        if (current != bytes32(0)) revert OsImageHashAlreadyAllowed(osImageHash, current);
        _applicationOf[osImageHash] = appId;
        emit OsImageHashAdded(osImageHash);
        emit OsImageHashAssigned(osImageHash, appId);
    }

    /// @notice Revoke an image. Reverts when it is not allowed.
    function removeOsImageHash(bytes32 osImageHash) external onlyOwner {
        if (_applicationOf[osImageHash] == bytes32(0)) revert OsImageHashNotAllowed(osImageHash);
        delete _applicationOf[osImageHash];
        emit OsImageHashRemoved(osImageHash);
    }

    /// @notice Whether an image is allowed (dstack-compatible view).
    function allowedOsImages(bytes32 osImageHash) external view returns (bool) {
        return _applicationOf[osImageHash] != bytes32(0);
    }

    /// @notice The KMS's one call: whether the image is allowed, and its application id
    /// (zero when not allowed).
    function imageStatus(bytes32 osImageHash) external view returns (bool allowed, bytes32 appId) {
        appId = _applicationOf[osImageHash];
        allowed = appId != bytes32(0);
    }

    /// @notice Register the KMS's secp256k1 signer (rotation: the old one stops counting at
    /// once, so statements it signed stop verifying). The zero address unregisters it.
    function setSigner(address newSigner) external onlyOwner {
        emit SignerChanged(signer, newSigner);
        signer = newSigner;
    }

    /// @notice First step of an ownership change: name the next owner. Passing the zero
    /// address cancels a pending transfer.
    function transferOwnership(address newOwner) external onlyOwner {
        pendingOwner = newOwner;
        emit OwnershipTransferStarted(owner, newOwner);
    }

    /// @notice Second step: the pending owner takes over. Proves the new owner can transact,
    /// so a typo in transferOwnership cannot lock the allowlist.
    function acceptOwnership() external {
        if (msg.sender != pendingOwner) revert NotPendingOwner(msg.sender);
        address previous = owner;
        owner = msg.sender;
        delete pendingOwner;
        emit OwnershipTransferred(previous, msg.sender);
    }
}
