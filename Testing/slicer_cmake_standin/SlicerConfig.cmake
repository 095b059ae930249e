# Stand-in for the SlicerConfig.cmake of a Slicer build tree, for Testing/test_slicer_module.py.
#
# It provides only what the extension's CMakeLists use: the scripted-module folders,
# Slicer_USE_FILE with slicerMacroBuildScriptedModule and slicer_add_python_unittest, and the
# extension config/CPack includes. slicerMacroBuildScriptedModule here checks its arguments
# as Slicer's CMake/SlicerMacroBuildScriptedModule.cmake does, and places files as
# CTK's ctkMacroCompilePythonScript does: a script given by an absolute path goes to its path
# relative to CMAKE_CURRENT_BINARY_DIR, other scripts and resources to their path as given;
# the whole folder is installed into Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_FOUND TRUE)
