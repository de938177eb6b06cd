// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @notice The one view of ImageAllowlist this contract needs.
interface IKmsSignerRegistry {
    function signer() external view returns (address);
}

/// @title ProvenanceCheck
/// @notice Example: decide on chain whether a key belongs to an attested enclave application.
/// The KMS releases a secp256k1 key to every allowed image of an application and signs a
/// provenance statement for it with its secp256k1 signer, as EIP-712 typed data:
///
///   domain  {name: "nitro-keyrelease", version: "1", chainId, verifyingContract: ALLOWLIST}
///   KeyProvenance(bytes32 application,string keyName,string keyType,bytes publicKey,
///                 bytes32 kmsIdentity)
///
/// where ALLOWLIST is the ImageAllowlist contract whose governance registered the signer
/// (setSigner). A statement verifies only while its signer is the registered one: after a
/// rotation, statements of the old signer stop verifying. See docs/protocol.md, "Provenance".
contract ProvenanceCheck {
    struct KeyProvenance {
        bytes32 application;
        string keyName;
        string keyType;
        bytes publicKey; // secp256k1: the 65-byte uncompressed SEC1 point 0x04 || x || y
        bytes32 kmsIdentity; // the KMS's Ed25519 identity key, raw
    }

    bytes32 public constant KEY_PROVENANCE_TYPEHASH = keccak256(
        "KeyProvenance(bytes32 application,string keyName,string keyType,bytes publicKey,"
        "bytes32 kmsIdentity)"
    );
    bytes32 private constant DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    /// @dev secp256k1n / 2: a signature with a larger s is the malleated twin of another.
    uint256 private constant HALF_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    /// @notice The ImageAllowlist contract that holds the registered KMS signer.
    IKmsSignerRegistry public immutable allowlist;

    constructor(address allowlist_) {
        allowlist = IKmsSignerRegistry(allowlist_);
    }

    /// @notice The EIP-712 domain separator: this chain and the allowlist contract.
    function domainSeparator() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                DOMAIN_TYPEHASH,
                keccak256("nitro-keyrelease"),
                keccak256("1"),
                block.chainid,
                address(allowlist)
            )
        );
    }

    /// @notice The EIP-712 digest the KMS signer signs for `statement`.
    function digest(KeyProvenance calldata statement) public view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                KEY_PROVENANCE_TYPEHASH,
                statement.application,
                keccak256(bytes(statement.keyName)),
                keccak256(bytes(statement.keyType)),
                keccak256(statement.publicKey),
                statement.kmsIdentity
            )
        );
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    /// @notice Who signed `statement`: the zero address for a malformed signature (not 65
    /// bytes r || s || v, v not 27 or 28, s in the upper half of the order).
    function signerOf(KeyProvenance calldata statement, bytes calldata signature)
        public
        view
        returns (address)
    {
        if (signature.length != 65) return address(0);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if ((v != 27 && v != 28) || uint256(s) > HALF_ORDER) return address(0);
        return ecrecover(digest(statement), v, r, s);
    }

    /// @notice Whether the key in `statement` belongs to `application`: the statement names
    /// that application and is signed by the KMS signer registered in the allowlist now.
    function belongsTo(
        bytes32 application,
        KeyProvenance calldata statement,
        bytes calldata signature
    ) public view returns (bool) {
        address registered = allowlist.signer();
        return registered != address(0) && statement.application == application
            && signerOf(statement, signature) == registered;
    }

    /// @notice The Ethereum account of a secp256k1 statement's key (zero for another type or
    /// a public key that is not a 65-byte uncompressed point).
    function accountOf(KeyProvenance calldata statement) public pure returns (address) {
        bytes calldata key = statement.publicKey;
        if (
            keccak256(bytes(statement.keyType)) != keccak256("secp256k1") || key.length != 65
                || key[0] != 0x04
        ) return address(0);
        return address(uint160(uint256(keccak256(key[1:]))));
    }

    /// @notice Whether `account` is the key `statement` vouches for, for `application`: what
    /// an oracle or wallet contract asks before trusting a signature made by `account`.
    function isApplicationAccount(
        bytes32 application,
        address account,
        KeyProvenance calldata statement,
        bytes calldata signature
    ) external view returns (bool) {
        return account != address(0) && accountOf(statement) == account
            && belongsTo(application, statement, signature);
    }
}
